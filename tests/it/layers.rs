//! The modules form layers: no module imports another that imports it back, directly or
//! through others. Read off the source (`crate::…` and `super::…` paths), at two grains:
//! between the crate's top-level modules, and between the files inside one of them (a
//! `mod.rs` declaring and re-exporting its children is not an import of them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `src/` by path (`ledger::store`), with its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if !matches!(name.as_str(), "mod" | "lib" | "main") {
                    p.push(name);
                }
                if !p.is_empty() {
                    out.insert(p.join("::"), std::fs::read_to_string(&path).unwrap());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &[], &mut out);
    out
}

/// The paths a source names after `anchor` (`crate::` or `super::`), as segments: one per
/// path, each item of a `{…}` group its own path.
fn paths_after(source: &str, anchor: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in source.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find(anchor) {
            let tail = &rest[i + anchor.len()..];
            let (head, group) = read_path(tail);
            if let Some(group) = group {
                for item in group.split(',') {
                    let (mut more, _) = read_path(item.trim());
                    let mut p = head.clone();
                    p.append(&mut more);
                    out.push(p);
                }
            } else {
                out.push(head);
            }
            rest = &tail[1..];
        }
    }
    out
}

/// `a::b::c…` at the start of `s`: its segments, and the inside of a trailing `{…}` group.
fn read_path(s: &str) -> (Vec<String>, Option<String>) {
    let mut segments = Vec::new();
    let mut rest = s;
    loop {
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if end > 0 {
            segments.push(rest[..end].to_owned());
        }
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(r) if r.starts_with('{') => {
                let close = r.find('}').unwrap_or(r.len());
                return (segments, Some(r[1..close].to_owned()));
            }
            Some(r) => rest = r,
            None => return (segments, None),
        }
    }
}

/// The module a path names: its longest prefix that is a module.
fn resolve(segments: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len()).rev().map(|n| segments[..n].join("::")).find(|m| known.contains(m))
}

/// Every edge `from -> to` (modules), read off the sources.
fn edges(mods: &BTreeMap<String, String>) -> BTreeSet<(String, String)> {
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let mut out = BTreeSet::new();
    for (module, source) in mods {
        // `super` in `a::b` (a file) is `a`; in `a` (a mod.rs) it is the crate.
        let parent: Vec<String> = {
            let mut p: Vec<String> = module.split("::").map(str::to_owned).collect();
            p.pop();
            p
        };
        let mut targets: Vec<Vec<String>> = paths_after(source, "crate::");
        for p in paths_after(source, "super::") {
            let mut full = parent.clone();
            full.extend(p);
            targets.push(full);
        }
        for t in targets {
            if let Some(to) = resolve(&t, &known)
                && &to != module
            {
                out.insert((module.clone(), to));
            }
        }
    }
    out
}

/// A cycle in `graph`, if any, as the modules along it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap()
}

#[test]
fn the_top_level_modules_form_layers() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges(&modules()) {
        if top(&from) != top(&to) {
            graph.entry(top(&from).to_owned()).or_default().insert(top(&to).to_owned());
        }
    }
    assert!(graph.len() > 10, "the parser found the modules: {graph:?}");
    if let Some(c) = cycle(&graph) {
        panic!("an import loop between modules: {}", c.join(" -> "));
    }
}

#[test]
fn the_files_inside_each_module_form_layers() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges(&modules()) {
        let facade_to_child = to.starts_with(&format!("{from}::"));
        if top(&from) == top(&to) && !facade_to_child {
            graph.entry(from).or_default().insert(to);
        }
    }
    if let Some(c) = cycle(&graph) {
        panic!("an import loop inside a module: {}", c.join(" -> "));
    }
}

#[test]
fn the_reader_sees_paths_and_groups() {
    let src = "use crate::ledger::{AuthKey, store::LedgerStore};\nfn f() { crate::telemetry::hot(); }\n// crate::nope\n";
    let paths = paths_after(src, "crate::");
    assert_eq!(
        paths,
        vec![vec!["ledger", "AuthKey"], vec!["ledger", "store", "LedgerStore"], vec!["telemetry", "hot"]]
    );
}

/// The layers `src/lib.rs` lists (`//! N. [`a`], [`b`]: …`), by module.
fn declared_layers() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else { continue };
        let Some((n, rest)) = rest.split_once(". ") else { continue };
        let Ok(n) = n.parse::<usize>() else { continue };
        let names = rest.split(':').next().unwrap();
        for name in names.split(',') {
            let name = name.trim().trim_start_matches("[`").trim_end_matches("`]");
            out.insert(name.to_owned(), n);
        }
    }
    out
}

#[test]
fn every_module_uses_only_its_layer_or_those_below_as_lib_rs_lists_them() {
    let layers = declared_layers();
    let mods = modules();
    let tops: BTreeSet<String> = mods.keys().map(|m| top(m).to_owned()).filter(|m| m != "cli").collect();
    let unlisted: Vec<_> = tops.iter().filter(|m| !layers.contains_key(*m)).collect();
    assert!(unlisted.is_empty(), "modules missing from the layers in src/lib.rs: {unlisted:?}");
    let mut upward = Vec::new();
    for (from, to) in edges(&mods) {
        let (from, to) = (top(&from), top(&to));
        if let (Some(a), Some(b)) = (layers.get(from), layers.get(to))
            && b > a
        {
            upward.push(format!("{from} (layer {a}) uses {to} (layer {b})"));
        }
    }
    assert!(upward.is_empty(), "imports up the layers: {upward:#?}");
}

/// A source's lines of code: comments (`//`, `///`, `//!`) dropped.
fn code_lines(source: &str) -> impl Iterator<Item = &str> {
    source.lines().filter(|l| !l.trim_start().starts_with("//"))
}

/// Whether `source` names the crate `krate` in code (a path through it, or a `use` of it).
fn names_crate(source: &str, krate: &str) -> bool {
    code_lines(source).any(|line| {
        line.match_indices(krate).any(|(i, _)| {
            let before = line[..i].chars().next_back();
            let after = &line[i + krate.len()..];
            let starts = before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            starts
                && (after.starts_with("::")
                    || (line.trim_start().starts_with("use ") && after.starts_with(';')))
        })
    })
}

/// Each database crate, and the only modules that may name it: the backend folder that
/// carries its name (and, for PostgreSQL, the test servers' starter). The ledger's seam
/// (`ledger::store`, `ledger::error`, ...) and everything above it name none.
const DATABASE_CRATES: [(&str, &[&str]); 4] = [
    ("rocksdb", &["ledger::rocks"]),
    ("tokio_postgres", &["ledger::postgres", "tools::postgres"]),
    ("tokio_postgres_rustls", &["ledger::postgres", "tools::postgres"]),
    ("postgres_types", &["ledger::postgres", "tools::postgres"]),
];

#[test]
fn only_each_backend_folder_names_its_database_crate() {
    let mut found = Vec::new();
    for (module, source) in modules() {
        for (krate, allowed) in DATABASE_CRATES {
            let inside = |a: &&str| module == *a || module.starts_with(&format!("{a}::"));
            if !allowed.iter().any(inside) && names_crate(&source, krate) {
                found.push(format!("{module} names {krate} (only {allowed:?} may)"));
            }
        }
    }
    assert!(found.is_empty(), "database crates outside their backend folders: {found:#?}");
    // The rule reads what it should: the backends do name their crates.
    let mods = modules();
    assert!(names_crate(&mods["ledger::rocks"], "rocksdb"));
    assert!(names_crate(&mods["ledger::postgres::connect"], "tokio_postgres"));
}

/// The longest a function in `src/` may be, in lines from its signature to its closing
/// brace (tests in the files included). A ratchet: lower it when the longest functions get
/// shorter; never raise it.
const LONGEST_FUNCTION: usize = 100;

/// The longest a file in `src/` may be, in lines (tests in the file included).
const LONGEST_FILE: usize = 600;

/// Every function of a (rustfmt-formatted) source: its name, first line and length in
/// lines. A function ends at the first line after its signature that is its own
/// indentation and a closing brace; a signature ending in `;` (a trait's) has no body.
fn functions(source: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let mut rest = trimmed;
        for prefix in ["pub(crate) ", "pub(super) ", "pub ", "const ", "async ", "unsafe ", "extern \"C\" "] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        let Some(rest) = rest.strip_prefix("fn ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if trimmed.trim_end().ends_with('}') {
            continue; // a body on one line
        }
        // The signature: up to the line that opens the body (or ends a bodiless one).
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';') || (j > i && lines[j].starts_with(&format!("{indent}}}")))
        }) else {
            continue;
        };
        let opened = lines[open].trim_end();
        if opened.ends_with(';') && !opened.contains('{') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = (open + 1..lines.len()).find(|&j| lines[j].trim_end() == close) else { continue };
        out.push((name, i + 1, end - i + 1));
    }
    out
}

#[test]
fn no_function_is_longer_than_the_ratchet_and_no_file_longer_than_its_limit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    walk(&root, &mut files);
    let (mut long_functions, mut long_files, mut longest) = (Vec::new(), Vec::new(), (0, String::new()));
    for path in &files {
        let source = std::fs::read_to_string(path).unwrap();
        let shown = path.strip_prefix(&root).unwrap().display().to_string();
        let lines = source.lines().count();
        if lines > LONGEST_FILE {
            long_files.push(format!("src/{shown}: {lines} lines"));
        }
        for (name, line, length) in functions(&source) {
            if length > longest.0 {
                longest = (length, format!("src/{shown}:{line} {name}"));
            }
            if length > LONGEST_FUNCTION {
                long_functions.push(format!("src/{shown}:{line} {name}: {length} lines"));
            }
        }
    }
    assert!(longest.0 > 20, "the reader found the functions: {longest:?}");
    assert!(
        long_functions.is_empty(),
        "functions over {LONGEST_FUNCTION} lines (split them; the limit only goes down): {long_functions:#?}"
    );
    assert!(long_files.is_empty(), "files over {LONGEST_FILE} lines: {long_files:#?}");
    println!("longest function: {} lines ({}); limit {LONGEST_FUNCTION}", longest.0, longest.1);
}

#[test]
fn the_function_reader_measures_bodies_and_skips_declarations() {
    let src = "trait T {\n    fn decl(&self);\n}\n\nimpl X {\n    pub(super) async fn two(\n        a: u8,\n    ) -> u8 {\n        a\n    }\n}\n\nfn one() {}\nfn three() {\n    let x = 1;\n}\n";
    assert_eq!(
        functions(src),
        vec![("two".to_owned(), 6, 5), ("three".to_owned(), 14, 3)],
        "one-line bodies and declarations are not counted"
    );
    assert!(names_crate("use rocksdb::DB;\n", "rocksdb"));
    assert!(names_crate("    let e: tokio_postgres::Error;\n", "tokio_postgres"));
    assert!(!names_crate("// rocksdb::DB\nlet s = \"rocksdb\";\n", "rocksdb"));
    assert!(!names_crate("use tokio_postgres_rustls::X;\n", "tokio_postgres"));
}

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
    let src =
        "use crate::ledger::{AuthKey, store::Ledger};\nfn f() { crate::telemetry::hot(); }\n// crate::nope\n";
    let paths = paths_after(src, "crate::");
    assert_eq!(
        paths,
        vec![vec!["ledger", "AuthKey"], vec!["ledger", "store", "Ledger"], vec!["telemetry", "hot"]]
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

//! The ops kit stays true to the daemon: the dashboard is valid JSON whose queries use only
//! metrics the daemon exports (and shows every one of them), the alert rules and the scrape
//! config pass `promtool check`, the alerts the runbook promises exist, and the example
//! configs load.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use x402_batcher::config::Config;
use x402_batcher::telemetry::NAMES;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `x402_batcher_*` name a PromQL text uses, with histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("x402_batcher_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| NAMES.contains(b)))
            .unwrap_or(name);
        out.insert(base.to_owned());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_exactly_the_exported_metrics() {
    let text = std::fs::read_to_string(root().join("ops/grafana/x402-batcher.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    let exported: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics the daemon does not export: {unknown:?}");
    let unshown: Vec<_> = exported.difference(&used).collect();
    assert!(unshown.is_empty(), "exported metrics without a panel: {unshown:?}");
}

#[test]
fn alert_rules_pass_promtool_and_use_exported_metrics() {
    let rules = root().join("ops/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let unknown: Vec<_> = metric_names(&text).into_iter().filter(|n| !NAMES.contains(&n.as_str())).collect();
    assert!(unknown.is_empty(), "alerts on metrics the daemon does not export: {unknown:?}");
    for alert in [
        "X402SettlerBalanceLow",
        "X402BacklogGrowing",
        "X402PaymentsNearDeadline",
        "X402ReorgSeen",
        "X402RpcErrors",
        "X402PaymentsExpired",
        "X402SettlementStalled",
        "X402ConnectionsRefused",
        "X402RpcEndpointOutOfUse",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "{alert} missing");
    }
    // promtool comes with Debian's prometheus package, which ops/setup.sh installs.
    for (what, file) in [("rules", &rules), ("config", &root().join("ops/prometheus/prometheus.yml"))] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(file)
            .output()
            .expect("promtool is installed (run ops/setup.sh)");
        assert!(
            out.status.success(),
            "promtool check {what} {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_example_configs_load() {
    for name in ["config.example.toml", "config.base-mainnet.toml", "config.devnet.toml"] {
        let config = Config::load(&root().join("ops").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        config.validate_for_run().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(config.metrics.listen.is_some(), "{name} serves metrics");
        assert!(config.settlement.enabled(), "{name} settles");
    }
}

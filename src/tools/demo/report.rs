//! What the demo found: its outcomes tallied off the ledger's books and batches, checked
//! (every payment has one outcome, every middleware request was paid once) and printed.

use std::collections::HashMap;

use super::{DemoError, DemoReport, HttpReport};
use crate::ledger::{BatchStatus, LedgerStore, LogEntry, RocksLedger, Status};

/// Reads the outcomes off the ledger's books and batches into `report`: the gRPC load's and,
/// apart, the middlewares' (`http`, their payments named after their callers' addresses).
pub(super) fn tally(
    ledger: &RocksLedger,
    chain_id: u64,
    http: Option<HttpReport>,
    report: &mut DemoReport,
) -> Result<(), DemoError> {
    // The middlewares' payments are named after their callers' addresses (`http:<ip>`).
    let via_http = |r: &crate::ledger::PaymentRecord| r.submission.api_server.starts_with("http:");
    let mut latencies = Vec::new();
    let entries: Vec<_> = ledger.settlement_log(0, usize::MAX)?.into_iter().map(|(_, r)| r).collect();
    // Each payment's own moments: its outcome entry (settled at depth) and its finality's.
    let (mut outcome_at, mut final_at) = (HashMap::new(), HashMap::new());
    for r in &entries {
        match r.log_entry {
            LogEntry::Outcome => {
                outcome_at.insert(r.payment_id(), r.updated_at_ms);
            }
            LogEntry::Finalized => {
                final_at.insert(r.payment_id(), r.updated_at_ms);
            }
            LogEntry::Corrected | LogEntry::Reversed => {}
        }
    }
    let mut final_latencies = Vec::new();
    let log: Vec<_> = crate::ledger::books(entries).into_iter().map(|r| (r.seq, r)).collect();
    let http_keys: std::collections::HashSet<_> =
        log.iter().filter(|(_, r)| via_http(r)).map(|(_, r)| r.key()).collect();
    for (_, r) in log.iter().filter(|(_, r)| !via_http(r)) {
        match r.status {
            Status::Settled => {
                report.settled += 1;
                let id = r.payment_id();
                let settled_at = outcome_at.get(&id).copied().unwrap_or(r.updated_at_ms);
                latencies.push(settled_at.saturating_sub(r.accepted_at_ms));
                if let Some(at) = final_at.get(&id) {
                    final_latencies.push(at.saturating_sub(r.accepted_at_ms));
                }
            }
            Status::Failed => report.failed += 1,
            Status::Expired => report.expired += 1,
            _ => {}
        }
    }
    let (mut gas, mut items) = (0u64, 0u64);
    let (mut http_gas, mut http_items, mut http_batches) = (0u64, 0u64, 0usize);
    for b in ledger.batches(chain_id)? {
        if b.items.iter().any(|k| http_keys.contains(k)) {
            http_batches += 1;
            if b.status == BatchStatus::Done
                && let Some(inc) = b.inclusion
            {
                http_gas += inc.gas_used;
                http_items += u64::from(inc.settled_items);
            }
            continue;
        }
        report.batches += 1;
        report.batch_sizes.push(b.items.len());
        *report.cut_reasons.entry(b.cut_reason.clone()).or_default() += 1;
        report.replacements += b.attempts.len().saturating_sub(1);
        if b.status == BatchStatus::Done
            && let Some(inc) = b.inclusion
        {
            gas += inc.gas_used;
            items += u64::from(inc.settled_items);
        }
    }
    report.gas_per_payment = if items == 0 { 0.0 } else { gas as f64 / items as f64 };
    report.http = http.map(|mut h| {
        h.settled = log.iter().filter(|(_, r)| via_http(r) && r.status == Status::Settled).count();
        h.batches = http_batches;
        h.gas_per_payment = if http_items == 0 { 0.0 } else { http_gas as f64 / http_items as f64 };
        h
    });
    report.latency_ms = percentiles(latencies);
    report.finalized = final_latencies.len();
    report.final_latency_ms = percentiles(final_latencies);
    Ok(())
}

/// p50, p90, p99 and max of `values` (zeros when empty).
fn percentiles(mut values: Vec<u64>) -> [u64; 4] {
    values.sort_unstable();
    let pct = |p: f64| {
        values.get(((values.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0)
    };
    [pct(0.50), pct(0.90), pct(0.99), values.last().copied().unwrap_or(0)]
}

/// Every accepted payment has one outcome, something settled, and every middleware request
/// was paid and settled once, its replays refused.
pub(super) fn check(report: &DemoReport) -> Result<(), DemoError> {
    if report.settled + report.failed + report.expired != report.accepted {
        return Err(DemoError::Mismatch(format!(
            "{} accepted but {} outcomes in the settlement log",
            report.accepted,
            report.settled + report.failed + report.expired
        )));
    }
    if report.settled == 0 {
        return Err(DemoError::Mismatch("nothing settled".into()));
    }
    if let Some(h) = &report.http {
        let paid: u64 = h.paid.values().sum();
        if paid != h.requests || h.settled as u64 != paid || h.replays_refused != h.replays {
            return Err(DemoError::Mismatch(format!(
                "middlewares: {paid} of {} requests paid, {} settled, {} of {} replays refused",
                h.requests, h.settled, h.replays_refused, h.replays
            )));
        }
    }
    Ok(())
}

pub(super) fn print_summary(r: &DemoReport, rows: usize, seconds: f64) {
    let mut sizes = r.batch_sizes.clone();
    sizes.sort_unstable();
    let median = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    println!("\nsummary");
    println!("  payments    offered {}, accepted {}", r.offered, r.accepted);
    println!("  outcomes    settled {}, failed {}, expired {}", r.settled, r.failed, r.expired);
    println!(
        "  batches     {} (sizes min {}, median {}, max {}); fee replacements {}",
        r.batches,
        sizes.first().copied().unwrap_or(0),
        median,
        sizes.last().copied().unwrap_or(0),
        r.replacements
    );
    let reasons: Vec<String> = r.cut_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  cut by      {}", reasons.join(", "));
    let ratio = if r.solo_gas == 0 { 0.0 } else { r.gas_per_payment / r.solo_gas as f64 };
    println!(
        "  gas         {:.0} per payment in batches vs {} as its own transaction: {:.3}x ({:.0}% saved)",
        r.gas_per_payment,
        r.solo_gas,
        ratio,
        (1.0 - ratio) * 100.0
    );
    let [p50, p90, p99, max] = r.latency_ms;
    println!(
        "  latency     accepted -> settled at depth: p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms"
    );
    if r.finalized > 0 {
        let [p50, p90, p99, max] = r.final_latency_ms;
        println!(
            "  finality    accepted -> finalized: p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms ({} of {} final by the end of the demo)",
            r.finalized, r.settled
        );
    } else {
        println!("  finality    none of the payments was final by the end of the demo");
    }
    println!("  wall time   {seconds:.1} s from the first submission to the last payment settled at depth");
    if let Some(h) = &r.http {
        let paid: u64 = h.paid.values().sum();
        let by: Vec<String> = h.paid.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("\n  x402 middlewares through the facilitator URL (x402-express, @x402/express)");
        println!("  paid        {paid} of {} requests answered 200 ({})", h.requests, by.join(", "));
        println!(
            "  replays     {} of {} resent payment headers refused (402, handler not run)",
            h.replays_refused, h.replays
        );
        let ratio = if r.solo_gas == 0 { 0.0 } else { h.gas_per_payment / r.solo_gas as f64 };
        println!(
            "  settled     {} payments in {} batches: {:.0} gas per payment ({:.3}x its own transaction; gRPC fleet {:.0})",
            h.settled, h.batches, h.gas_per_payment, ratio, r.gas_per_payment
        );
    }
    println!("  ledger      {} (settlement log: column family `settlement`)", r.ledger_path.display());
    println!("  export      {} ({rows} rows, CSV)", r.export_path.display());
}

//! Finance export of the settlement log: one row per payment that reached a final state
//! (settled, failed, expired), in the order they did, as CSV (RFC 4180) or JSON Lines.
//!
//! Amounts are integers in base units with an exact decimal rendering beside them (the
//! token's decimals; nothing is rounded). Times are UTC (RFC 3339). The log's sequence
//! numbers make exports incremental: each run starts after a saved cursor and returns the
//! last entry it read, so successive runs see every entry exactly once, whatever the
//! filters (the cursor moves past entries a filter leaves out too: keep the filters of one
//! cursor fixed).

use std::collections::BTreeMap;
use std::io::Write;

use alloy::primitives::{Address, U256};

use crate::config::TokenTable;
use crate::ledger::{LedgerError, LedgerStore, PaymentRecord, Status};

/// The CSV columns, in order.
pub const COLUMNS: &[&str] = &[
    "log_seq",
    "payment_id",
    "status",
    "reason",
    "chain_id",
    "token",
    "symbol",
    "payer",
    "payee",
    "amount_base_units",
    "amount",
    "nonce",
    "api_server",
    "resource",
    "accepted_at",
    "final_at",
    "tx_hash",
    "block_number",
    "block_hash",
    "log_index",
    "batch_id",
    "gas_share",
    "fee_share_wei",
];

/// Entries read from the ledger per step.
const PAGE: usize = 1024;

/// Why an export failed. Nothing is half-written to the cursor: it moves only after the
/// output was written in full.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot write the export")]
    Io(#[from] std::io::Error),
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// Which entries to export; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Final time (unix seconds) at or after this.
    pub from: Option<u64>,
    /// Final time before this.
    pub to: Option<u64>,
    pub payer: Option<Address>,
    pub payee: Option<Address>,
    pub status: Option<Status>,
    pub chain_id: Option<u64>,
    pub token: Option<Address>,
}

impl Filter {
    pub fn matches(&self, r: &PaymentRecord) -> bool {
        let a = &r.signed.authorization;
        let t = final_time(r);
        self.from.is_none_or(|f| t >= f)
            && self.to.is_none_or(|to| t < to)
            && self.payer.is_none_or(|p| a.from == p)
            && self.payee.is_none_or(|p| a.to == p)
            && self.status.is_none_or(|s| r.status == s)
            && self.chain_id.is_none_or(|c| r.signed.chain_id == c)
            && self.token.is_none_or(|t| r.signed.token == t)
    }
}

/// When a payment became final (unix seconds): the including block's time for a settled
/// payment, the time the daemon recorded the outcome otherwise.
pub fn final_time(r: &PaymentRecord) -> u64 {
    if r.status == Status::Settled && r.block_time > 0 { r.block_time } else { r.updated_at_ms / 1000 }
}

/// What an export run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows written.
    pub rows: usize,
    /// The last settlement log entry read: the cursor for the next run.
    pub cursor: u64,
    /// Settled amounts per (UTC day, chain, token, payee): payments and sum in base units.
    pub totals: BTreeMap<(String, u64, Address, Address), (u64, U256)>,
}

/// Writes the settlement log entries after `after` that pass `filter` to `out`.
pub fn export(
    ledger: &dyn LedgerStore,
    tokens: &TokenTable,
    after: u64,
    filter: &Filter,
    format: Format,
    out: &mut impl Write,
) -> Result<Summary, ExportError> {
    let mut summary = Summary { cursor: after, ..Summary::default() };
    if format == Format::Csv {
        write!(out, "{}\r\n", COLUMNS.join(","))?;
    }
    loop {
        let page = ledger.settlement_log(summary.cursor, PAGE)?;
        let Some(&(last, _)) = page.last() else { break };
        for (seq, r) in page.iter().filter(|(_, r)| filter.matches(r)) {
            let fields = fields(*seq, r, tokens);
            match format {
                Format::Csv => {
                    let line: Vec<String> = fields.iter().map(|(_, v)| csv_field(v)).collect();
                    write!(out, "{}\r\n", line.join(","))?;
                }
                Format::JsonLines => {
                    let object: serde_json::Map<String, serde_json::Value> = fields
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                        .collect();
                    writeln!(out, "{}", serde_json::Value::Object(object))?;
                }
            }
            summary.rows += 1;
            if r.status == Status::Settled {
                let a = &r.signed.authorization;
                let day = utc(final_time(r) * 1000)[..10].to_owned();
                let e = summary.totals.entry((day, r.signed.chain_id, r.signed.token, a.to)).or_default();
                e.0 += 1;
                e.1 += a.value;
            }
        }
        summary.cursor = last;
    }
    out.flush()?;
    Ok(summary)
}

/// Writes `summary`'s totals as CSV: day, chain, token, symbol, payee, payments, amount.
pub fn write_totals(summary: &Summary, tokens: &TokenTable, out: &mut impl Write) -> Result<(), ExportError> {
    write!(out, "day,chain_id,token,symbol,payee,payments,amount_base_units,amount\r\n")?;
    for ((day, chain_id, token, payee), (n, sum)) in &summary.totals {
        let (symbol, decimals) = token_info(tokens, *chain_id, *token);
        write!(
            out,
            "{day},{chain_id},{token},{},{payee},{n},{sum},{}\r\n",
            csv_field(symbol),
            format_units(*sum, decimals)
        )?;
    }
    out.flush()?;
    Ok(())
}

fn token_info(tokens: &TokenTable, chain_id: u64, token: Address) -> (&str, u8) {
    tokens.get(chain_id, token).map_or(("", 0), |t| (t.symbol.as_str(), t.decimals))
}

/// One entry's columns, named, in [`COLUMNS`] order.
fn fields(seq: u64, r: &PaymentRecord, tokens: &TokenTable) -> Vec<(&'static str, String)> {
    let s = &r.signed;
    let a = &s.authorization;
    let (symbol, decimals) = token_info(tokens, s.chain_id, s.token);
    // Unknown token (not in this config): no decimal rendering rather than a wrong one.
    let amount = if tokens.get(s.chain_id, s.token).is_some() {
        format_units(a.value, decimals)
    } else {
        String::new()
    };
    let hash = |h: Option<alloy::primitives::B256>| h.map(|h| h.to_string()).unwrap_or_default();
    let values = [
        seq.to_string(),
        r.payment_id().to_string(),
        r.status.as_str().to_owned(),
        r.failure_reason.clone(),
        s.chain_id.to_string(),
        s.token.to_string(),
        symbol.to_owned(),
        a.from.to_string(),
        a.to.to_string(),
        a.value.to_string(),
        amount,
        a.nonce.to_string(),
        r.submission.api_server.clone(),
        r.submission.resource.clone(),
        utc(r.accepted_at_ms),
        utc(final_time(r) * 1000),
        hash(r.tx_hash),
        if r.tx_hash.is_some() { r.block_number.to_string() } else { String::new() },
        hash(r.block_hash),
        if r.tx_hash.is_some() { r.log_index.to_string() } else { String::new() },
        r.batch_id.clone(),
        r.gas_share.to_string(),
        r.fee_share_wei.to_string(),
    ];
    COLUMNS.iter().copied().zip(values).collect()
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\r', '\n']) { format!("\"{}\"", v.replace('"', "\"\"")) } else { v.to_owned() }
}

/// `value` in base units as a decimal string with `decimals` places.
pub fn format_units(value: U256, decimals: u8) -> String {
    if decimals == 0 {
        return value.to_string();
    }
    let digits = format!("{value:0>width$}", width = decimals as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - decimals as usize);
    format!("{int}.{frac}")
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-21T04:51:25.123Z`).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

/// Parses a time for a filter: unix seconds, `YYYY-MM-DD` (midnight UTC), or
/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(text: &str) -> Option<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Some(secs);
    }
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z')?)),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return None; // 2026-02-30 and the like
    }
    let mut secs = u64::try_from(days).ok()? * 86_400;
    if let Some(t) = time {
        let mut hms = t.splitn(3, ':');
        let h: u64 = hms.next()?.parse().ok()?;
        let mi: u64 = hms.next()?.parse().ok()?;
        let s: u64 = hms.next()?.parse().ok()?;
        if h > 23 || mi > 59 || s > 59 {
            return None;
        }
        secs += h * 3600 + mi * 60 + s;
    }
    Some(secs)
}

// Days since 1970-01-01 and the proleptic Gregorian calendar (H. Hinnant's algorithms).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_format_exactly() {
        assert_eq!(format_units(U256::from(1_234_567u64), 6), "1.234567");
        assert_eq!(format_units(U256::from(5u64), 6), "0.000005");
        assert_eq!(format_units(U256::ZERO, 6), "0.000000");
        assert_eq!(format_units(U256::from(42u64), 0), "42");
        assert_eq!(format_units(U256::MAX, 18).len(), U256::MAX.to_string().len() + 1);
    }

    #[test]
    fn times_are_utc_and_parse_back() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_795_236_685_123), "2026-11-21T04:51:25.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_time("2026-11-21T04:51:25Z"), Some(1_795_236_685));
        assert_eq!(parse_time("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_time("1795236685"), Some(1_795_236_685));
        for bad in
            ["2026-02-30", "2026-13-01", "2026-11-21T24:00:00Z", "2026-11-21T04:51:25", "yesterday", ""]
        {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        for days in [0i64, 59, 60, 365, 10_957, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}

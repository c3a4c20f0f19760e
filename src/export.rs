//! Finance export of the settlement log: one row per entry, in the order they were logged,
//! as CSV (RFC 4180) or JSON Lines. Each payment's outcome (settled, failed, expired) is an
//! entry (`entry` = `outcome`); a settled payment's later entries follow the chain past the
//! confirmation depth: `corrected` (a reorg mined its transaction again in another block:
//! the row carries the new evidence), `reversed` (a reorg removed its transaction: the row
//! is the settlement undone; the payment is settled again later, a new `outcome` row, or
//! expires) and `finalized` (its block is final on chain: nothing changes it any more). So
//! settled amounts are the `outcome` rows of status settled minus the `reversed` rows.
//!
//! Amounts are integers in base units with an exact decimal rendering beside them (the
//! token's decimals; nothing is rounded). Times are UTC (RFC 3339). The log's sequence
//! numbers make exports incremental: each run starts after a saved cursor and returns the
//! last entry it read, so successive runs see every entry exactly once, whatever the
//! filters (the cursor moves past entries a filter leaves out too: keep the filters of one
//! cursor fixed).
//!
//! The cursor protocol ([`run`] with a [`Cursor`]): read the saved position (none: from the
//! beginning), write the whole output and sync it, then save the new position whole or not
//! at all (a temporary file, synced, renamed over the old one). A crash at any point repeats
//! the last run's rows at worst; it never skips one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use alloy::primitives::{Address, U256};

use crate::config::TokenTable;
use crate::ledger::{LedgerError, LedgerStore, LogEntry, PaymentRecord, Status};

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
    "recorded_at",
    "block_time",
    "tx_hash",
    "block_number",
    "block_hash",
    "log_index",
    "batch_id",
    "gas_share",
    "fee_share_wei",
    "entry",
    "finalized_at",
    "payer_route",
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
    #[error("cannot write the export as CSV")]
    Csv(#[from] csv::Error),
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cursor file {path} does not hold a log position")]
    CursorContent { path: String },
    #[error("{flag} {value:?}: expected {expected}")]
    Flag { flag: &'static str, value: String, expected: &'static str },
}

fn file_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + use<> {
    let path = path.display().to_string();
    move |source| ExportError::File { what, path, source }
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// `csv` or `jsonl`.
    pub fn from_flag(value: &str) -> Result<Format, ExportError> {
        match value {
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::JsonLines),
            _ => {
                Err(ExportError::Flag { flag: "--format", value: value.to_owned(), expected: "csv or jsonl" })
            }
        }
    }
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

/// A final status by name: `settled`, `failed` or `expired`.
pub fn status_from_flag(value: &str) -> Result<Status, ExportError> {
    match value {
        "settled" => Ok(Status::Settled),
        "failed" => Ok(Status::Failed),
        "expired" => Ok(Status::Expired),
        _ => Err(ExportError::Flag {
            flag: "--status",
            value: value.to_owned(),
            expected: "settled, failed or expired",
        }),
    }
}

/// A filter time given as `flag` (see [`parse_time`]).
pub fn time_from_flag(flag: &'static str, value: &str) -> Result<u64, ExportError> {
    parse_time(value).ok_or_else(|| ExportError::Flag {
        flag,
        value: value.to_owned(),
        expected: "unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ",
    })
}

/// When a payment became final (unix seconds), for the filters and the daily totals: the
/// including block's time for a settled payment (`block_time`, the chain's clock, whole
/// seconds), the time the daemon recorded the outcome otherwise (`recorded_at`, its clock).
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
    /// Amounts per (UTC day, chain, token, payee), in base units.
    pub totals: BTreeMap<(String, u64, Address, Address), Total>,
}

/// One day's amounts for one payee: settlements logged, and settlements reversed (by a
/// reorg deeper than the confirmation depth; the day is the reversed settlement's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total {
    pub settled: u64,
    pub settled_amount: U256,
    pub reversed: u64,
    pub reversed_amount: U256,
}

/// A saved position in the settlement log, in a file of its own.
#[derive(Debug, Clone)]
pub struct Cursor {
    path: PathBuf,
}

impl Cursor {
    pub fn at(path: impl Into<PathBuf>) -> Cursor {
        Cursor { path: path.into() }
    }

    /// The saved position; 0 (the beginning) when none was saved yet.
    pub fn read(&self) -> Result<u64, ExportError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| ExportError::CursorContent { path: self.path.display().to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(file_error("cursor file", &self.path)(e)),
        }
    }

    /// Saves `position` whole or not at all: a reader sees the old position or the new one.
    pub fn save(&self, position: u64) -> Result<(), ExportError> {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{position}\n")).map_err(file_error("cursor file", &tmp))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(file_error("cursor file", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(file_error("cursor file", &self.path))?;
        // The rename itself is durable once the directory is.
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(file_error("cursor directory", dir))
    }
}

/// Where a run starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// After this log position.
    After(u64),
    /// After the cursor's saved position; the cursor moves once the output is complete.
    Cursor(Cursor),
}

/// One export run, as the `export` command describes it.
#[derive(Debug, Clone)]
pub struct Job {
    pub start: Start,
    pub filter: Filter,
    pub format: Format,
    /// Where to write (a file, synced before the cursor moves); standard output if `None`.
    pub out: Option<PathBuf>,
    /// Also write the settled totals per payee per UTC day (CSV) here.
    pub totals: Option<PathBuf>,
}

/// Runs `job` on `ledger`: the rows, the totals, then the cursor (see the module's
/// cursor protocol).
pub fn run(ledger: &dyn LedgerStore, tokens: &TokenTable, job: &Job) -> Result<Summary, ExportError> {
    let after = match &job.start {
        Start::After(position) => *position,
        Start::Cursor(cursor) => cursor.read()?,
    };
    let summary = match &job.out {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(file_error("output", path))?;
            let mut w = std::io::BufWriter::new(file);
            let summary = export(ledger, tokens, after, &job.filter, job.format, &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all().map_err(file_error("output", path))?;
            summary
        }
        None => export(ledger, tokens, after, &job.filter, job.format, &mut std::io::stdout().lock())?,
    };
    if let Some(path) = &job.totals {
        let file = std::fs::File::create(path).map_err(file_error("totals", path))?;
        let mut w = std::io::BufWriter::new(file);
        write_totals(&summary, tokens, &mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all().map_err(file_error("totals", path))?;
    }
    if let Start::Cursor(cursor) = &job.start {
        cursor.save(summary.cursor)?;
    }
    Ok(summary)
}

fn csv_writer<W: Write>(out: W) -> csv::Writer<W> {
    csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(out)
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
    enum Sink<'a, W: Write> {
        Csv(csv::Writer<&'a mut W>),
        Json(&'a mut W),
    }
    let mut summary = Summary { cursor: after, ..Summary::default() };
    let mut sink = match format {
        Format::Csv => {
            let mut w = csv_writer(out);
            w.write_record(COLUMNS)?;
            Sink::Csv(w)
        }
        Format::JsonLines => Sink::Json(out),
    };
    loop {
        let page = ledger.settlement_log(summary.cursor, PAGE)?;
        let Some(&(last, _)) = page.last() else { break };
        for (seq, r) in page.iter().filter(|(_, r)| filter.matches(r)) {
            let fields = fields(*seq, r, tokens);
            match &mut sink {
                Sink::Csv(w) => w.write_record(fields.iter().map(|(_, v)| v))?,
                Sink::Json(out) => {
                    let object: serde_json::Map<String, serde_json::Value> = fields
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                        .collect();
                    writeln!(out, "{}", serde_json::Value::Object(object))?;
                }
            }
            summary.rows += 1;
            let counts = match r.log_entry {
                LogEntry::Outcome => r.status == Status::Settled,
                LogEntry::Reversed => true,
                LogEntry::Corrected | LogEntry::Finalized => false,
            };
            if counts {
                let a = &r.signed.authorization;
                let day = utc(final_time(r) * 1000)[..10].to_owned();
                let e = summary.totals.entry((day, r.signed.chain_id, r.signed.token, a.to)).or_default();
                if r.log_entry == LogEntry::Reversed {
                    e.reversed += 1;
                    e.reversed_amount += a.value;
                } else {
                    e.settled += 1;
                    e.settled_amount += a.value;
                }
            }
        }
        summary.cursor = last;
    }
    match sink {
        Sink::Csv(mut w) => w.flush()?,
        Sink::Json(out) => out.flush()?,
    }
    Ok(summary)
}

/// Writes `summary`'s totals as CSV: day, chain, token, symbol, payee, payments, amount.
pub fn write_totals(summary: &Summary, tokens: &TokenTable, out: &mut impl Write) -> Result<(), ExportError> {
    let mut w = csv_writer(out);
    w.write_record([
        "day",
        "chain_id",
        "token",
        "symbol",
        "payee",
        "payments",
        "amount_base_units",
        "amount",
        "reversed_payments",
        "reversed_amount_base_units",
        "reversed_amount",
    ])?;
    for ((day, chain_id, token, payee), t) in &summary.totals {
        let (symbol, decimals) = token_info(tokens, *chain_id, *token);
        w.write_record([
            day.clone(),
            chain_id.to_string(),
            token.to_string(),
            symbol.to_owned(),
            payee.to_string(),
            t.settled.to_string(),
            t.settled_amount.to_string(),
            format_units(t.settled_amount, decimals),
            t.reversed.to_string(),
            t.reversed_amount.to_string(),
            format_units(t.reversed_amount, decimals),
        ])?;
    }
    w.flush()?;
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
        utc(r.updated_at_ms),
        if r.status == Status::Settled && r.block_time > 0 {
            utc(r.block_time * 1000)
        } else {
            String::new()
        },
        hash(r.tx_hash),
        if r.tx_hash.is_some() { r.block_number.to_string() } else { String::new() },
        hash(r.block_hash),
        if r.tx_hash.is_some() { r.log_index.to_string() } else { String::new() },
        r.batch_id.clone(),
        r.gas_share.to_string(),
        r.fee_share_wei.to_string(),
        r.log_entry.as_str().to_owned(),
        if r.finalized_at_ms > 0 { utc(r.finalized_at_ms) } else { String::new() },
        r.submission.route.as_str().to_owned(),
    ];
    COLUMNS.iter().copied().zip(values).collect()
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
    match i64::try_from(ms).ok().and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
        Some(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        // Past the year 9999: no calendar date, the number itself.
        None => ms.to_string(),
    }
}

/// Parses a time for a filter: unix seconds, `YYYY-MM-DD` (midnight UTC), or
/// `YYYY-MM-DDTHH:MM:SSZ`; never before 1970.
pub fn parse_time(text: &str) -> Option<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Some(secs);
    }
    let secs = match text.split_once('T') {
        Some((_, time)) if time.len() == 9 && time.ends_with('Z') => {
            text.parse::<jiff::Timestamp>().ok()?.as_second()
        }
        Some(_) => return None,
        None if text.len() == 10 => text
            .parse::<jiff::civil::Date>()
            .ok()?
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()?
            .timestamp()
            .as_second(),
        None => return None,
    };
    u64::try_from(secs).ok()
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
        // Every day's midnight, printed and parsed back (leap days, centuries included).
        for days in [0u64, 59, 60, 365, 10_957, 11_016, 20_000, 100_000] {
            let day = &utc(days * 86_400_000)[..10];
            assert_eq!(parse_time(day), Some(days * 86_400), "{day}");
        }
    }

    #[test]
    fn a_cursor_reads_what_was_saved_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = Cursor::at(dir.path().join("export.cursor"));
        assert_eq!(cursor.read().unwrap(), 0, "no cursor yet: from the beginning");
        cursor.save(41).unwrap();
        cursor.save(42).unwrap();
        assert_eq!(cursor.read().unwrap(), 42);
        assert!(!dir.path().join("export.tmp").exists(), "no temporary file left");
        std::fs::write(dir.path().join("export.cursor"), "forty-two").unwrap();
        assert!(matches!(cursor.read(), Err(ExportError::CursorContent { .. })));
    }

    fn job(dir: &Path, out: PathBuf) -> Job {
        Job {
            start: Start::Cursor(Cursor::at(dir.join("c"))),
            filter: Filter::default(),
            format: Format::Csv,
            out: Some(out),
            totals: Some(dir.join("totals.csv")),
        }
    }

    #[test]
    fn a_run_writes_the_output_then_moves_the_cursor_and_a_failed_write_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::RocksLedger::open(&dir.path().join("ledger")).unwrap();
        let tokens = TokenTable::default();
        Cursor::at(dir.path().join("c")).save(7).unwrap();
        let summary = run(&ledger, &tokens, &job(dir.path(), dir.path().join("out.csv"))).unwrap();
        assert_eq!((summary.rows, summary.cursor), (0, 7), "nothing after 7: the cursor stays");
        let out = std::fs::read_to_string(dir.path().join("out.csv")).unwrap();
        assert_eq!(out, format!("{}\r\n", COLUMNS.join(",")));
        assert!(std::fs::read_to_string(dir.path().join("totals.csv")).unwrap().starts_with("day,"));

        let unwritable = job(dir.path(), dir.path().join("missing/out.csv"));
        assert!(matches!(run(&ledger, &tokens, &unwritable), Err(ExportError::File { what: "output", .. })));
        assert_eq!(Cursor::at(dir.path().join("c")).read().unwrap(), 7);
    }

    #[test]
    fn flags_are_named_in_their_errors() {
        assert_eq!(Format::from_flag("jsonl").unwrap(), Format::JsonLines);
        let e = Format::from_flag("xml").unwrap_err().to_string();
        assert_eq!(e, "--format \"xml\": expected csv or jsonl");
        assert_eq!(status_from_flag("expired").unwrap(), Status::Expired);
        assert!(status_from_flag("pending").unwrap_err().to_string().contains("--status"));
        assert_eq!(time_from_flag("--from", "2000-02-29").unwrap(), 951_782_400);
        assert!(time_from_flag("--to", "soon").unwrap_err().to_string().starts_with("--to \"soon\""));
    }
}

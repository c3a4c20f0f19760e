//! Settlement log export: one CSV row per payment that reached a final state, in the order
//! they did. Amounts are integers in base units, with a decimal rendering beside them for
//! people; nothing is rounded.

use std::io::Write;

use alloy::primitives::U256;

use crate::config::TokenTable;
use crate::ledger::{Ledger, LedgerError, PaymentRecord};

/// The CSV header.
pub const HEADER: &str = "log_seq,payment_id,status,reason,chain_id,token,symbol,from,to,value_base_units,value,\
tx_hash,block_number,block_hash,block_time,log_index,gas_share,fee_share_wei,batch_id,accepted_at_ms,final_at_ms";

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot write the export")]
    Io(#[from] std::io::Error),
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

fn row(seq: u64, r: &PaymentRecord, tokens: &TokenTable) -> String {
    let s = &r.signed;
    let token = tokens.get(s.chain_id, s.token);
    let (symbol, decimals) = token.map_or(("", 0), |t| (t.symbol.as_str(), t.decimals));
    let hash = |h: Option<alloy::primitives::B256>| h.map(|h| h.to_string()).unwrap_or_default();
    format!(
        "{seq},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.payment_id(),
        r.status.to_api().as_str_name().trim_start_matches("PAYMENT_STATUS_").to_lowercase(),
        r.failure_reason,
        s.chain_id,
        s.token,
        symbol,
        s.authorization.from,
        s.authorization.to,
        s.authorization.value,
        format_units(s.authorization.value, decimals),
        hash(r.tx_hash),
        r.block_number,
        hash(r.block_hash),
        r.block_time,
        r.log_index,
        r.gas_share,
        r.fee_share_wei,
        r.batch_id,
        r.accepted_at_ms,
        r.updated_at_ms,
    )
}

/// Writes every settlement log entry after `after` as CSV; returns the rows written.
pub fn write_csv(
    ledger: &Ledger,
    tokens: &TokenTable,
    after: u64,
    out: &mut impl Write,
) -> Result<usize, ExportError> {
    writeln!(out, "{HEADER}")?;
    let mut cursor = after;
    let mut rows = 0;
    loop {
        let page = ledger.settlement_log(cursor, 1024)?;
        let Some(&(last, _)) = page.last() else { break };
        for (seq, r) in &page {
            writeln!(out, "{}", row(*seq, r, tokens))?;
        }
        rows += page.len();
        cursor = last;
    }
    Ok(rows)
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
}

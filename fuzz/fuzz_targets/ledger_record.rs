//! The ledger's record codecs on arbitrary bytes (a corrupt disk): a record decodes or is
//! named corrupt, never a panic; what decodes encodes back to bytes that decode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_batcher::ledger::{BatchRecord, PaymentRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = PaymentRecord::decode(data) {
        let again = PaymentRecord::decode(&r.encode()).expect("an encoded record decodes");
        assert_eq!(again, r);
    }
    if let Ok(b) = BatchRecord::decode(data) {
        let again = BatchRecord::decode(&b.encode()).expect("an encoded batch decodes");
        assert_eq!(again, b);
    }
});

//! The payment payload's JSON (after base64): decoded or refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = x402_batcher::x402::decode::decode_json(data) {
        let _ = e.reason().code();
    }
});

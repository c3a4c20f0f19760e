//! An x402 payment header (v1 X-PAYMENT or v2 PAYMENT-SIGNATURE, base64 JSON): decoding
//! returns a payload or a typed error with its reason code, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = x402_batcher::x402::decode::decode_header(&text) {
        let _ = e.reason().code();
    }
});

//! A body of the facilitator's `POST /verify` or `POST /settle` (v1 or v2, with or without
//! the payment-identifier extension): decoded, or refused with a typed error and its x402
//! reason code, never a panic; what decodes keeps the protocol's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_batcher::facilitator::wire;

fuzz_target!(|data: &[u8]| {
    match wire::request(data) {
        Ok(request) => {
            assert!(matches!(request.x402_version, 1 | 2), "version {}", request.x402_version);
            if let Some(id) = &request.payment_identifier {
                assert!(wire::valid_payment_identifier(id), "identifier {id:?} kept");
            }
        }
        Err(e) => {
            let _ = (e.reason().code(), e.is_malformed_request(), e.to_string());
        }
    }
});

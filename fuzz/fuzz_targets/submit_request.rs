//! A gRPC SubmitRequest as it arrives on the wire, through the protobuf-to-domain
//! conversion (payment and requirements): converted or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use x402_batcher::api::{self, v1};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = v1::SubmitRequest::decode(data) else { return };
    match api::payment_input(&req) {
        Ok(_) => {}
        Err(e) => {
            let _ = (e.is_malformed_request(), e.reason().code());
        }
    }
    let _ = api::requirements(&req);
});

//! The facilitator's `Authorization` header, as raw bytes from the network: checked against
//! one configured bearer token, it admits that token alone and refuses anything else with a
//! status, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use x402_batcher::auth::{Auth, Role};
use x402_batcher::config::CredentialConfig;

const TOKEN: &str = "x4b_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn auth() -> &'static Arc<Auth> {
    static AUTH: OnceLock<Arc<Auth>> = OnceLock::new();
    AUTH.get_or_init(|| {
        let shop = CredentialConfig {
            name: "shop".into(),
            role: Role::Api,
            token_sha256: Some(hex::encode(x402_batcher::auth::hash_token(TOKEN))),
            cert_name: None,
        };
        Auth::new(&[shop]).expect("a valid credential")
    })
}

fuzz_target!(|data: &[u8]| {
    // What the HTTP stack hands over: a header value, as text when it is visible ASCII.
    let text = std::str::from_utf8(data).ok().filter(|t| t.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let authorization = Some(text);
    match auth().check("facilitator", Role::Api, authorization, None) {
        Ok(Some(principal)) => {
            let presented =
                text.and_then(|t| t.strip_prefix("Bearer ").or_else(|| t.strip_prefix("bearer "))).map(str::trim);
            assert_eq!(presented, Some(TOKEN), "admitted {:?}", text);
            assert_eq!(&*principal.name, "shop");
        }
        Ok(None) => panic!("authentication is on: nobody passes without a credential"),
        Err(status) => {
            let _ = status.message();
        }
    }
});

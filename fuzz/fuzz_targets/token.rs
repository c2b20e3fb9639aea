//! The token parser and verifier, against a real issuer's keys: any header value, as sent in
//! `authorization`. Never a panic, and nothing but a token signed by the key passes.
#![no_main]

use std::sync::OnceLock;

use ca_server::TrustDomain;
use ca_server::auth::dev::{DEV_ISSUER, DevIssuer};
use ca_server::auth::{Authenticator, BearerToken, Fetcher, IssuerKeys, TokenIssuer};
use libfuzzer_sys::fuzz_target;

struct Setup {
    authn: Authenticator,
    runtime: tokio::runtime::Runtime,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ca-fuzz-token-{}", std::process::id()));
        let dev = DevIssuer::load_or_create(&dir).expect("dev issuer");
        let authn = Authenticator::new(
            TrustDomain::new("cluster.local").expect("trust domain"),
            vec![TokenIssuer::new(
                DEV_ISSUER.into(),
                vec!["istio-ca".into()],
                IssuerKeys::fixed(dev.key_set()),
            )],
            Fetcher::new(None).expect("fetcher"),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Setup { authn, runtime }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let text = String::from_utf8_lossy(data);
    for header in [text.to_string(), format!("Bearer {text}")] {
        if let Ok(token) = BearerToken::from_header(&header) {
            let now = 1_800_000_000;
            // Random bytes never carry the dev issuer's signature.
            assert!(
                s.runtime
                    .block_on(s.authn.authenticate(&token, None, now))
                    .is_err()
            );
        }
    }
});

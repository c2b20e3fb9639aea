//! The SPIFFE ID parser: never a panic; what it accepts prints back as given and parses to
//! the same ID.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for candidate in [text.to_string(), format!("spiffe://{text}")] {
        if let Ok(id) = ca_server::SpiffeId::parse(&candidate) {
            assert_eq!(id.to_string(), candidate);
            assert_eq!(ca_server::SpiffeId::parse(&id.to_string()).ok(), Some(id));
        }
    }
});

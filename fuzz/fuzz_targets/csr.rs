//! The CSR parser and checker: any text, and any bytes as the body of a PEM CSR block (so
//! that the DER parser and the signature check see arbitrary input). Never a panic.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ca_server::issuance::check_csr(&String::from_utf8_lossy(data));
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    if let Ok(csr) = ca_server::issuance::check_csr(&pem) {
        // What passes names only SANs that are valid SPIFFE IDs.
        for san in &csr.requested_sans {
            assert!(ca_server::SpiffeId::parse(san).is_ok(), "{san}");
        }
    }
});

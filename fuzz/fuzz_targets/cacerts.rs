//! The `cacerts` import checks on four arbitrary files (the input split at 0xFF bytes):
//! never a panic, whatever the certificates and key hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xFF).map(String::from_utf8_lossy);
    let mut next = || parts.next().map(|p| p.into_owned()).unwrap_or_default();
    let (ca, key, chain, root) = (next(), next(), next(), next());
    let _ = ca_server::authority::import::check_cacerts(
        std::path::Path::new("cacerts"),
        &ca,
        Zeroizing::new(key),
        &chain,
        &root,
    );
});

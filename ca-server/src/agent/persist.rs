//! The agent's files: `key.pem` (0600, written first), `cert-chain.pem` (the leaf and any
//! intermediates) and `root-cert.pem` (the trust bundle), each replaced atomically, for
//! workloads that read files and for the agent itself after a restart.

use std::path::Path;

use anyhow::{Context, bail};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::client::Obtained;
use super::state::{Roots, Svid};
use crate::spiffe::SpiffeId;
use crate::x509::{pem_to_der, split_pem};

const KEY: &str = "key.pem";
const CHAIN: &str = "cert-chain.pem";
const ROOTS: &str = "root-cert.pem";
const JWT_BUNDLE: &str = "jwt-bundle.json";

fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    crate::files::write_atomic(&path, contents, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// The token in `path`, read afresh (a projected token is rotated in place).
pub fn read_token(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --token-file {}", path.display()))?;
    let token = Zeroizing::new(text.trim().to_owned());
    if token.is_empty() {
        bail!("--token-file {} is empty", path.display());
    }
    Ok(token)
}

/// Writes the key before the certificate, each atomically, so a reader that sees a new
/// certificate also finds its key.
pub fn write_credentials(dir: &Path, obtained: &Obtained) -> anyhow::Result<()> {
    let key_pem = Zeroizing::new(crate::x509::pem("PRIVATE KEY", &obtained.key_der));
    write_file(dir, KEY, key_pem.as_bytes(), 0o600)?;
    let without_root = &obtained.chain[..obtained.chain.len() - 1];
    write_file(dir, CHAIN, without_root.concat().as_bytes(), 0o644)
}

/// Writes the JWT bundle (a JWK Set).
pub fn write_jwt_bundle(dir: &Path, jwks: &str) -> anyhow::Result<()> {
    write_file(dir, JWT_BUNDLE, jwks.as_bytes(), 0o644)
}

/// Writes the trust bundle (PEM).
pub fn write_roots(dir: &Path, roots_pem: &str) -> anyhow::Result<()> {
    write_file(dir, ROOTS, roots_pem.as_bytes(), 0o644)
}

/// The SVID, bundle and the leaf's notBefore kept in `dir` by an earlier run, if all three
/// files are there, the key is private and certified by the leaf, and the leaf is still valid
/// at `now`. `Ok(None)`: nothing kept (a first start).
pub fn restore(
    dir: &Path,
    now: OffsetDateTime,
) -> anyhow::Result<Option<(Svid, Roots, OffsetDateTime)>> {
    let key_path = dir.join(KEY);
    let key_pem = match std::fs::read_to_string(&key_path) {
        Ok(text) => Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", key_path.display())),
    };
    if let Some(mode) = crate::files::too_open(&key_path)? {
        bail!(
            "{} is readable by others (mode {mode:o})",
            key_path.display()
        );
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let chain_pem = read(CHAIN)?;
    let roots_pem = read(ROOTS)?;
    let key = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
        Ok(Some(rustls_pki_types::PrivateKeyDer::Pkcs8(der))) => {
            Zeroizing::new(der.secret_pkcs8_der().to_vec())
        }
        Ok(_) => bail!("{KEY} holds no PKCS#8 private key"),
        Err(e) => bail!("{KEY}: {e}"),
    };
    let to_der = |pems: Vec<String>, what: &str| -> anyhow::Result<Vec<Vec<u8>>> {
        pems.iter()
            .map(|pem| pem_to_der(pem).map(|der| der.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let chain = to_der(split_pem(&chain_pem), CHAIN)?;
    let certificates = to_der(split_pem(&roots_pem), ROOTS)?;
    let Some(leaf) = chain.first() else {
        bail!("{CHAIN} holds no certificate");
    };
    if certificates.is_empty() {
        bail!("{ROOTS} holds no certificate");
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow::anyhow!("{CHAIN}: {e}"))?;
    let pair =
        rcgen::KeyPair::try_from(key.as_slice()).map_err(|e| anyhow::anyhow!("{KEY}: {e}"))?;
    if rcgen::PublicKeyData::subject_public_key_info(&pair) != parsed.public_key().raw {
        bail!("{KEY} is not the key {CHAIN} certifies");
    }
    let not_before = parsed.validity().not_before.to_datetime();
    let not_after = parsed.validity().not_after.to_datetime();
    if not_after <= now {
        bail!(
            "the kept SVID expired at {}",
            crate::rfc3339::text(not_after)
        );
    }
    let spiffe_id =
        SpiffeId::from_certificate(leaf).with_context(|| format!("{CHAIN}: no SPIFFE ID"))?;
    let trust_domain_id = spiffe_id.trust_domain().id_string();
    Ok(Some((
        Svid {
            spiffe_id,
            chain,
            key,
            not_after,
        },
        Roots {
            trust_domain_id,
            certificates,
            sequence: 0,
            // Absent (an agent from before JWT bundles): none until the CA answers.
            jwt_jwks: std::fs::read_to_string(dir.join(JWT_BUNDLE))
                .unwrap_or_else(|_| r#"{"keys":[]}"#.to_owned()),
            // Taints come with the CA's bundle, when it answers.
            tainted: Vec::new(),
            tainted_kids: Vec::new(),
        },
        not_before,
    )))
}

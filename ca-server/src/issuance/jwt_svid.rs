//! JWT-SVIDs behind `MintJwtSvid`: the caller authenticates as for a certificate, the
//! audiences and TTL are checked, the active authority's JWT-SVID key signs, and the issuance
//! is in the audit log before the token leaves.

use std::sync::Arc;
use std::time::Instant;

use time::{Duration, OffsetDateTime};
use tracing::{debug, warn};

use super::pipeline::{Caller, CertificateAuthority};
use super::refusal::Refusal;
use super::refusals::{Known, event_for};
use crate::audit::EventKind;
use crate::authority::{JwtKey, KeyError};
use crate::class::{Class, Classify};
use crate::untrusted;

/// The TTL of a JWT-SVID whose request asks for none.
pub const DEFAULT_JWT_TTL: Duration = Duration::minutes(5);
/// The longest TTL a JWT-SVID may have: a bearer token that leaks is good until it expires.
pub const MAX_JWT_TTL: Duration = Duration::hours(1);
/// How many audiences one JWT-SVID may name.
pub const MAX_AUDIENCES: usize = 16;
/// The longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 256;

/// A JWT-SVID request, as the transport received it.
#[derive(Debug)]
pub struct JwtRequest {
    /// Who asks.
    pub caller: Caller,
    /// The audiences asked for.
    pub audience: Vec<String>,
    /// Requested TTL in seconds; 0 for the default.
    pub ttl_secs: i64,
}

/// A minted JWT-SVID. Its `Debug` leaves the token out: it is a bearer credential.
pub struct MintedJwt {
    /// JWS compact serialization.
    pub token: String,
    /// Its `sub`.
    pub spiffe_id: String,
    /// Its `iat`, unix seconds.
    pub issued_at: i64,
    /// Its `exp`, unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedJwt")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a JWT-SVID was not minted (besides the refusals it shares with certificates).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// No audience.
    #[error("a JWT-SVID needs at least one audience (the relying party that will verify it)")]
    NoAudience,
    /// Too many audiences.
    #[error("{0} audiences asked for; a JWT-SVID names at most {MAX_AUDIENCES}")]
    TooManyAudiences(usize),
    /// An audience that is empty, too long, or not printable text.
    #[error(
        "audience {index} is {why}; an audience is 1 to {MAX_AUDIENCE_BYTES} bytes of printable \
         text"
    )]
    BadAudience {
        /// Its place in the request, from 0.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A negative TTL.
    #[error("ttl_seconds {0} is negative; send 0 for the default ({default}s)", default = DEFAULT_JWT_TTL.whole_seconds())]
    NegativeTtl(i64),
    /// A TTL above the maximum.
    #[error("ttl_seconds {0} is above the maximum of {max}s for a JWT-SVID", max = MAX_JWT_TTL.whole_seconds())]
    TtlAboveMax(i64),
    /// The active authority is not valid now.
    #[error(
        "the active authority is valid only until {}; rotate it with `ca-server root prepare` \
         and `root activate`",
        crate::rfc3339::text(*.0)
    )]
    AuthorityNotValid(OffsetDateTime),
    /// The active authority has no JWT-SVID key (made by a replica that predates them).
    #[error(
        "the active authority {0} has no JWT-SVID key; restart a server of this version, which \
         makes it one"
    )]
    NoKey(i64),
    /// Signing failed (a bug or a broken key).
    #[error("signing the JWT-SVID failed: {0}")]
    Sign(#[from] KeyError),
}

impl Classify for JwtError {
    fn class(&self) -> Class {
        match self {
            Self::NoAudience
            | Self::TooManyAudiences(_)
            | Self::BadAudience { .. }
            | Self::NegativeTtl(_)
            | Self::TtlAboveMax(_) => Class::Caller,
            Self::AuthorityNotValid(_) => Class::Unavailable,
            Self::NoKey(_) | Self::Sign(_) => Class::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::NoAudience | Self::TooManyAudiences(_) | Self::BadAudience { .. } => "audience",
            Self::NegativeTtl(_) | Self::TtlAboveMax(_) => "ttl",
            Self::AuthorityNotValid(_) => "authority_not_valid",
            Self::NoKey(_) | Self::Sign(_) => "signing",
        }
    }
}

/// The audiences of a request, checked, in the order asked and each once.
pub fn check_audience(asked: &[String]) -> Result<Vec<String>, JwtError> {
    if asked.is_empty() {
        return Err(JwtError::NoAudience);
    }
    if asked.len() > MAX_AUDIENCES {
        return Err(JwtError::TooManyAudiences(asked.len()));
    }
    let mut kept: Vec<String> = Vec::with_capacity(asked.len());
    for (index, audience) in asked.iter().enumerate() {
        let why = if audience.is_empty() {
            Some("empty".to_owned())
        } else if audience.len() > MAX_AUDIENCE_BYTES {
            Some(format!("{} bytes", audience.len()))
        } else if audience.chars().any(char::is_control) {
            Some("not printable (it holds a control character)".to_owned())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(JwtError::BadAudience { index, why });
        }
        if !kept.contains(audience) {
            kept.push(audience.clone());
        }
    }
    Ok(kept)
}

/// The TTL for a request: 0 means the default; negative or above the maximum is refused.
pub fn jwt_ttl(requested_secs: i64) -> Result<Duration, JwtError> {
    match requested_secs {
        0 => Ok(DEFAULT_JWT_TTL),
        n if n < 0 => Err(JwtError::NegativeTtl(n)),
        n if n > MAX_JWT_TTL.whole_seconds() => Err(JwtError::TtlAboveMax(n)),
        n => Ok(Duration::seconds(n)),
    }
}

/// The claims of a JWT-SVID. `aud` is a string when there is one audience (as most relying
/// parties, cloud STS services among them, expect) and an array otherwise.
pub fn claims(
    spiffe_id: &str,
    audience: &[String],
    issuer: Option<&str>,
    issued_at: i64,
    expires_at: i64,
    jti: &str,
) -> serde_json::Value {
    let aud = match audience {
        [one] => serde_json::Value::from(one.as_str()),
        many => serde_json::Value::from(many.to_vec()),
    };
    let mut claims = serde_json::json!({
        "sub": spiffe_id,
        "aud": aud,
        "iat": issued_at,
        "exp": expires_at,
        "jti": jti,
    });
    if let Some(issuer) = issuer {
        claims["iss"] = issuer.into();
    }
    claims
}

impl CertificateAuthority {
    /// Mints a JWT-SVID for the caller's verified identity and the audiences it asks for, or
    /// refuses; either way the decision is in the audit log before this returns.
    pub async fn mint_jwt_svid(&self, request: JwtRequest) -> Result<MintedJwt, Refusal> {
        let now = OffsetDateTime::now_utc();
        let mut known = Known::default();
        let coming = self.audit.expect();
        let outcome = self.try_mint(&request, now, &mut known).await;
        drop(coming);
        match outcome {
            Ok((minted, authority_id, audience)) => {
                let mut event = event_for(EventKind::Issued, now, &known, request.caller.peer);
                event.serial = Some(jti_of(&minted.token));
                event.not_before = Some(minted.issued_at);
                event.not_after = Some(minted.expires_at);
                event.authority_id = Some(authority_id);
                event.audience = Some(serde_json::Value::from(audience).to_string());
                match self.audit.record(event).await {
                    Ok(seq) => {
                        debug!(spiffe_id = %minted.spiffe_id, audit_seq = seq, "Issued JWT-SVID");
                        crate::metrics::metrics().jwt_issuances.inc();
                        Ok(minted)
                    }
                    Err(e) => {
                        warn!(spiffe_id = %minted.spiffe_id, error = %e, "JWT-SVID withheld: its audit record was not committed");
                        Err(Refusal::Audit(e))
                    }
                }
            }
            Err(refusal) => {
                let requested = format!(
                    "JWT-SVID for audience {}",
                    serde_json::Value::from(request.audience.clone())
                );
                self.refuse(
                    request.caller.peer,
                    Some(untrusted::claim(&requested)),
                    now,
                    known,
                    &refusal,
                )
                .await;
                Err(refusal)
            }
        }
    }

    async fn try_mint(
        &self,
        request: &JwtRequest,
        now: OffsetDateTime,
        known: &mut Known,
    ) -> Result<(MintedJwt, i64, Vec<String>), Refusal> {
        let caller = self.authenticate(&request.caller, now).await?;
        known.identity = Some(caller.clone());
        let audience = check_audience(&request.audience)?;
        let ttl = jwt_ttl(request.ttl_secs)?;
        // Counted apart from the identity's certificates, against the same limit.
        self.take_identity_budget(format!("{} (JWT-SVID)", caller.spiffe_id), Instant::now())?;

        let active = Arc::clone(&self.active.borrow());
        let authority = &active.authority;
        let key: Arc<JwtKey> = active.jwt.clone().ok_or(JwtError::NoKey(authority.id()))?;
        if now < authority.not_before() || now >= authority.not_after() {
            return Err(JwtError::AuthorityNotValid(authority.not_after()).into());
        }
        let issued_at = now.unix_timestamp();
        // Never past the authority's end: its JWT-SVID key leaves the bundle with it.
        let expires_at = (now + ttl).min(authority.not_after()).unix_timestamp();
        let (_, jti) = crate::x509::random_serial();
        let spiffe_id = caller.spiffe_id.to_string();
        let claims = claims(
            &spiffe_id,
            &audience,
            self.jwt_issuer.as_deref(),
            issued_at,
            expires_at,
            &jti,
        );
        // Signing is CPU work (or a PKCS#11 call): off the reactor.
        let token = self
            .pool
            .run(move || key.compact(&claims))
            .await?
            .map_err(|e| Refusal::Jwt(JwtError::Sign(e)))?;
        Ok((
            MintedJwt {
                token,
                spiffe_id,
                issued_at,
                expires_at,
            },
            authority.id(),
            audience,
        ))
    }
}

/// The `jti` of a token this module signed (it is read back rather than carried beside).
fn jti_of(token: &str) -> String {
    use base64::Engine;
    token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims["jti"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn audiences_are_checked_and_kept_once_each() {
        assert_eq!(
            check_audience(&strings(&["a", "b", "a"])).unwrap(),
            strings(&["a", "b"])
        );
        assert!(matches!(check_audience(&[]), Err(JwtError::NoAudience)));
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        assert!(matches!(
            check_audience(&many),
            Err(JwtError::TooManyAudiences(17))
        ));
        assert!(check_audience(&many[..16]).is_ok());
        for bad in ["", "a\nb", "\u{7f}"] {
            let err = check_audience(&strings(&["ok", bad])).unwrap_err();
            assert!(
                matches!(err, JwtError::BadAudience { index: 1, .. }),
                "{bad:?}: {err}"
            );
        }
        let long = "x".repeat(MAX_AUDIENCE_BYTES + 1);
        assert!(check_audience(&[long]).is_err());
        assert!(check_audience(&["x".repeat(MAX_AUDIENCE_BYTES)]).is_ok());
        assert_eq!(
            JwtError::NoAudience.class(),
            Class::Caller,
            "an INVALID_ARGUMENT"
        );
    }

    #[test]
    fn ttls_default_and_stop_at_an_hour() {
        assert_eq!(jwt_ttl(0).unwrap(), DEFAULT_JWT_TTL);
        assert_eq!(jwt_ttl(3600).unwrap(), Duration::hours(1));
        assert!(matches!(jwt_ttl(3601), Err(JwtError::TtlAboveMax(3601))));
        assert!(matches!(jwt_ttl(-1), Err(JwtError::NegativeTtl(-1))));
    }

    #[test]
    fn one_audience_is_a_string_several_an_array() {
        let one = claims(
            "spiffe://td/x",
            &strings(&["a"]),
            Some("https://i"),
            1,
            2,
            "j",
        );
        assert_eq!(one["aud"], "a");
        assert_eq!(one["iss"], "https://i");
        let two = claims("spiffe://td/x", &strings(&["a", "b"]), None, 1, 2, "j");
        assert_eq!(two["aud"], serde_json::json!(["a", "b"]));
        assert!(two.get("iss").is_none());
        let key = JwtKey::generate().unwrap();
        assert_eq!(jti_of(&key.compact(&one).unwrap()), "j");
    }
}

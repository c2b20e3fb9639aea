//! JWT-SVIDs on the agent's socket: `FetchJWTSVID` mints through the CA (`MintJwtSvid`, with
//! the agent's token) and keeps each token until half its life has passed, and
//! `ValidateJWTSVID` checks a token against the JWT bundle the agent holds.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_proto::ca::v1::MintJwtSvidRequest;
use ca_proto::ca::v1::jwt_svid_service_client::JwtSvidServiceClient;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tonic::Status;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::persist;
use super::state::Roots;
use crate::spiffe::SpiffeId;

/// How many audience sets the agent keeps a token for; past it the one nearest its end goes.
const CACHED_SETS: usize = 64;

/// How long a mint may take before the workload is told the CA did not answer.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest JWT-SVID `ValidateJWTSVID` reads.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Clock skew allowed on `exp` and `nbf`, as for the tokens the CA verifies.
const LEEWAY_SECS: u64 = 60;

/// A JWT-SVID as minted. Its `Debug` leaves the token out.
#[derive(Clone)]
pub struct Minted {
    /// JWS compact serialization.
    pub token: Arc<Zeroizing<String>>,
    /// Its `sub`.
    pub spiffe_id: String,
    /// The `kid` of the key that signed it.
    kid: String,
    issued_at: i64,
    expires_at: i64,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Minted {
    /// Whether it is still worth handing out at `now`: before half its life.
    fn fresh(&self, now: i64) -> bool {
        now < self.issued_at + (self.expires_at - self.issued_at) / 2
    }
}

/// Mints JWT-SVIDs through the CA and keeps them per audience set.
#[derive(Debug)]
pub struct Minter {
    token_file: PathBuf,
    ttl_secs: i64,
    /// The channel of the agent's current session with the CA (none before the first).
    channel: Mutex<Option<Channel>>,
    cache: Mutex<HashMap<Vec<String>, Minted>>,
    /// One mint at a time: requests for a set being minted wait and find it kept.
    minting: tokio::sync::Mutex<()>,
}

impl Minter {
    /// A minter presenting the token in `token_file`, asking for `ttl_secs` (0: the CA's
    /// default).
    pub fn new(token_file: PathBuf, ttl_secs: i64) -> Self {
        Self {
            token_file,
            ttl_secs,
            channel: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            minting: tokio::sync::Mutex::new(()),
        }
    }

    /// Drops the tokens signed by the keys `kids` (a tainted authority's): the next request
    /// for their audiences mints anew.
    pub fn forget_signed_by(&self, kids: &[String]) {
        if kids.is_empty() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, m| !kids.contains(&m.kid));
    }

    /// The channel to mint through from now on.
    pub fn connected(&self, channel: Channel) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
    }

    fn kept(&self, key: &[String], now: i64) -> Option<Minted> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|m| m.fresh(now)).cloned()
    }

    fn keep(&self, key: Vec<String>, minted: Minted, now: i64) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, m| m.expires_at > now);
        if cache.len() >= CACHED_SETS
            && let Some(soonest) = cache
                .iter()
                .min_by_key(|(_, m)| m.expires_at)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&soonest);
        }
        cache.insert(key, minted);
    }

    /// A JWT-SVID for `audience` (already checked): the one kept for that set while it is
    /// fresh, else a new one from the CA.
    pub async fn fetch(&self, audience: Vec<String>) -> Result<Minted, Status> {
        let mut key = audience.clone();
        key.sort();
        let now = || time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(minted) = self.kept(&key, now()) {
            return Ok(minted);
        }
        let _one = self.minting.lock().await;
        if let Some(minted) = self.kept(&key, now()) {
            return Ok(minted);
        }
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Status::unavailable("the agent has not reached the CA yet"))?;
        let token = persist::read_token(&self.token_file)
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let mut request = tonic::Request::new(MintJwtSvidRequest {
            audience,
            ttl_seconds: self.ttl_secs,
        });
        let header = format!("Bearer {}", token.as_str())
            .parse()
            .map_err(|_| Status::internal("the agent's token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", header);
        request.set_timeout(MINT_TIMEOUT);
        let answer = tokio::time::timeout(
            MINT_TIMEOUT,
            JwtSvidServiceClient::new(channel).mint_jwt_svid(request),
        )
        .await
        .map_err(|_| Status::unavailable("the CA did not answer in time"))?
        .map_err(|s| {
            // The CA's code stands (a refused token, a limit); the message says who refused.
            Status::new(s.code(), format!("the CA refused: {}", s.message()))
        })?
        .into_inner();
        let kid = jsonwebtoken::decode_header(&answer.token)
            .ok()
            .and_then(|h| h.kid)
            .unwrap_or_default();
        let minted = Minted {
            token: Arc::new(Zeroizing::new(answer.token)),
            spiffe_id: answer.spiffe_id,
            kid,
            issued_at: answer.issued_at,
            expires_at: answer.expires_at,
        };
        self.keep(key, minted.clone(), now());
        Ok(minted)
    }
}

/// Why a token did not validate.
fn invalid(why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("the JWT-SVID is not valid: {why}"))
}

/// The algorithm a JWK's key is used with: ES256/ES384 for EC P-256/P-384; for RSA, the one
/// the token names if it is RS* or PS*.
fn algorithm_for(params: &AlgorithmParameters, named: Algorithm) -> Option<Algorithm> {
    use Algorithm::*;
    match params {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(ES256),
            EllipticCurve::P384 => Some(ES384),
            _ => None,
        },
        AlgorithmParameters::RSA(_) => {
            matches!(named, RS256 | RS384 | RS512 | PS256 | PS384 | PS512).then_some(named)
        }
        _ => None,
    }
}

/// Checks `token` for `audience` against `roots`' JWT bundle: signed by one of its keys
/// (by `kid`), not expired (60 s leeway), `aud` holding `audience`, and `sub` a SPIFFE ID of
/// the bundle's trust domain. Returns the SPIFFE ID and the claims.
pub fn validate(
    roots: &Roots,
    audience: &str,
    token: &str,
) -> Result<(SpiffeId, serde_json::Value), Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if token.is_empty() {
        return Err(Status::invalid_argument("svid must be specified"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "{} bytes, above the {MAX_TOKEN_BYTES} read",
            token.len()
        )));
    }
    let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
    // JWT-SVID: a `typ`, if present, is JWT or JOSE.
    if let Some(typ) = header.typ.as_deref()
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(invalid(format!(
            "its typ is {}, not JWT or JOSE",
            crate::untrusted::claim(typ)
        )));
    }
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| invalid("its header has no kid"))?;
    let set: JwkSet = serde_json::from_str(&roots.jwt_jwks)
        .map_err(|e| Status::unavailable(format!("the agent's JWT bundle is unreadable: {e}")))?;
    let jwk = set.find(kid).ok_or_else(|| {
        invalid(format!(
            "no key with kid {} in the JWT bundle of {}",
            crate::untrusted::claim(kid),
            roots.trust_domain_id
        ))
    })?;
    let algorithm = algorithm_for(&jwk.algorithm, header.alg)
        .filter(|a| *a == header.alg)
        .ok_or_else(|| invalid(format!("alg {:?} does not fit its key", header.alg)))?;
    let key = DecodingKey::from_jwk(jwk).map_err(invalid)?;
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECS;
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(invalid)?
        .claims;
    let sub = claims["sub"].as_str().unwrap_or_default();
    let spiffe_id = SpiffeId::parse(sub).map_err(|e| invalid(format!("its sub: {e}")))?;
    if spiffe_id.trust_domain().id_string() != roots.trust_domain_id {
        return Err(invalid(format!(
            "its sub {spiffe_id} is not in the trust domain of the key that signed it ({})",
            roots.trust_domain_id
        )));
    }
    Ok((spiffe_id, claims))
}

/// A JSON object as a `google.protobuf.Struct` (anything else as an empty one).
pub fn to_struct(value: serde_json::Value) -> prost_types::Struct {
    match to_value(value).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => prost_types::Struct::default(),
    }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::JwtKey;
    use tonic::Code;

    fn roots_with(keys: &[&JwtKey]) -> Roots {
        let jwks: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                let mut jwk = k.public().jwk.clone();
                jwk["kid"] = k.public().kid.clone().into();
                jwk["use"] = "jwt-svid".into();
                jwk
            })
            .collect();
        Roots {
            trust_domain_id: "spiffe://cluster.local".into(),
            certificates: Vec::new(),
            sequence: 1,
            jwt_jwks: serde_json::json!({ "keys": jwks }).to_string(),
            tainted: Vec::new(),
            tainted_kids: Vec::new(),
        }
    }

    fn token(key: &JwtKey, sub: &str, aud: serde_json::Value, exp_in: i64) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        key.compact(&serde_json::json!({"sub": sub, "aud": aud, "iat": now, "exp": now + exp_in}))
            .unwrap()
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn a_token_of_the_bundle_validates_for_its_audience_and_nothing_else_does() {
        let key = JwtKey::generate().unwrap();
        let roots = roots_with(&[&key]);
        let good = token(&key, WEB, "db".into(), 300);
        let (id, claims) = validate(&roots, "db", &good).unwrap();
        assert_eq!(id.to_string(), WEB);
        assert_eq!(claims["aud"], "db");
        let several = token(&key, WEB, serde_json::json!(["a", "db"]), 300);
        assert!(validate(&roots, "db", &several).is_ok());

        let refused = |audience: &str, token: &str| {
            let status = validate(&roots, audience, token).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            status.message().to_owned()
        };
        assert!(refused("other", &good).contains("not valid"));
        assert!(refused("db", &token(&key, WEB, "db".into(), -120)).contains("not valid"));
        let stranger = JwtKey::generate().unwrap();
        assert!(refused("db", &token(&stranger, WEB, "db".into(), 300)).contains("no key"));
        // A key of the bundle signing for another trust domain.
        let foreign = token(&key, "spiffe://elsewhere/ns/a/sa/b", "db".into(), 300);
        assert!(refused("db", &foreign).contains("trust domain"));
        assert!(refused("db", &token(&key, "not-spiffe", "db".into(), 300)).contains("sub"));
        // A signature that does not match.
        let mut tampered = good.clone();
        tampered.replace_range(tampered.len() - 4.., "AAAA");
        refused("db", &tampered);
        refused("db", "not a token");
        // A header with a typ a JWT-SVID may not have; and alg none.
        let body = good.split('.').nth(1).unwrap();
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let header =
            b64(serde_json::json!({"alg": "ES256", "kid": key.public().kid, "typ": "at+jwt"}));
        assert!(refused("db", &format!("{header}.{body}.AAAA")).contains("typ"));
        let none = b64(serde_json::json!({"alg": "none", "kid": key.public().kid}));
        refused("db", &format!("{none}.{body}."));
        refused("", &good);
        refused("db", "");
        refused("db", &"a".repeat(MAX_TOKEN_BYTES + 1));
    }

    #[test]
    fn claims_become_a_struct() {
        let s = to_struct(serde_json::json!({"a": [1, "x", null], "b": {"c": true}}));
        assert_eq!(s.fields.len(), 2);
        assert!(matches!(
            s.fields["b"].kind,
            Some(prost_types::value::Kind::StructValue(_))
        ));
    }

    #[test]
    fn kept_tokens_are_fresh_for_half_their_life() {
        let minted = Minted {
            token: Arc::new(Zeroizing::new("t".into())),
            spiffe_id: WEB.into(),
            kid: "k1".into(),
            issued_at: 1000,
            expires_at: 1300,
        };
        assert!(minted.fresh(1149));
        assert!(!minted.fresh(1150));
        let minter = Minter::new("unused".into(), 0);
        for i in 0..CACHED_SETS + 10 {
            let mut m = minted.clone();
            m.expires_at = 2000 + i as i64;
            minter.keep(vec![i.to_string()], m, 1000);
        }
        let cache = minter.cache.lock().unwrap();
        assert_eq!(cache.len(), CACHED_SETS);
        // The ones nearest their end made room.
        assert!(!cache.contains_key(&vec!["0".to_owned()]));
        assert!(cache.contains_key(&vec![(CACHED_SETS + 9).to_string()]));
        drop(cache);
        // A tainted authority's key: its tokens go.
        minter.forget_signed_by(&["k1".to_owned()]);
        assert!(minter.cache.lock().unwrap().is_empty());
    }
}

//! Claim rules for Kubernetes service-account tokens: a pure function of the decoded claims,
//! the issuer's policy and the time.

use serde::Deserialize;

use super::AuthError;

/// Leeway for `nbf` and `iat` in the future (clock skew between the API server and us).
pub const LEEWAY_SECS: i64 = 60;

/// The claims we read. Everything is optional here so that a missing claim gets its own
/// message rather than a generic parse error.
#[derive(Debug, Deserialize)]
pub struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
    iat: Option<serde_json::Number>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<Named>,
    pod: Option<Named>,
    /// The node the pod was scheduled on (Kubernetes 1.30 and later put it in pod-bound
    /// tokens).
    node: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: Option<String>,
    uid: Option<String>,
}

/// What the claims say about the caller, once every rule holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// The namespace from `sub`.
    pub namespace: String,
    /// The service account from `sub`.
    pub name: String,
    /// The pod, where the `kubernetes.io` claim names one.
    pub pod_name: Option<String>,
    /// The pod's uid.
    pub pod_uid: Option<String>,
    /// The pod's node, where the `kubernetes.io` claim names one.
    pub node_name: Option<String>,
    /// When the token expires (unix seconds).
    pub expires_at: i64,
}

/// What an issuer accepts.
#[derive(Debug, Clone)]
pub struct ClaimPolicy {
    /// The exact `iss`.
    pub issuer: String,
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
}

fn seconds(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

impl Claims {
    /// The `iss` claim, used to pick the issuer before the signature is checked.
    pub fn issuer(&self) -> Option<&str> {
        self.iss.as_deref()
    }

    /// The `exp` claim, unverified: only ever used to shorten how long an answer is kept.
    pub fn expiry(&self) -> Option<i64> {
        self.exp.as_ref().and_then(seconds)
    }

    /// Applies every rule of DESIGN.md's "Caller authentication".
    pub fn check(&self, policy: &ClaimPolicy, now: i64) -> Result<ServiceAccount, AuthError> {
        match &self.iss {
            Some(iss) if *iss == policy.issuer => {}
            Some(iss) => {
                return Err(AuthError::WrongIssuer {
                    got: crate::untrusted::claim(iss),
                    want: policy.issuer.clone(),
                });
            }
            None => return Err(AuthError::MissingClaim("iss")),
        }

        let audiences: Vec<&str> = match &self.aud {
            Some(Audience::One(a)) => vec![a.as_str()],
            Some(Audience::Many(list)) => list.iter().map(String::as_str).collect(),
            None => Vec::new(),
        };
        if !audiences
            .iter()
            .any(|a| policy.audiences.iter().any(|w| w == a))
        {
            return Err(AuthError::WrongAudience {
                got: audiences
                    .iter()
                    .take(8)
                    .map(|s| crate::untrusted::claim(s))
                    .collect(),
                want: policy.audiences.clone(),
            });
        }

        let exp = self.check_times(now)?;
        let sub = self.sub.as_deref().ok_or(AuthError::MissingClaim("sub"))?;
        let (namespace, name) = parse_subject(sub)?;
        let mut account = ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pod_name: None,
            pod_uid: None,
            node_name: None,
            expires_at: exp,
        };
        if let Some(k) = &self.kubernetes {
            let k_ns = k.namespace.as_deref();
            let k_sa = k.serviceaccount.as_ref().and_then(|s| s.name.as_deref());
            if k_ns.is_some_and(|ns| ns != namespace) || k_sa.is_some_and(|sa| sa != name) {
                return Err(AuthError::SubjectMismatch {
                    sub: crate::untrusted::claim(sub),
                    kubernetes: crate::untrusted::claim(&format!(
                        "{}/{}",
                        k_ns.unwrap_or("?"),
                        k_sa.unwrap_or("?")
                    )),
                });
            }
            if let Some(pod) = &k.pod {
                account.pod_name = pod.name.clone();
                account.pod_uid = pod.uid.clone();
            }
            account.node_name = k.node.as_ref().and_then(|n| n.name.clone());
        }
        Ok(account)
    }

    /// `exp` is there and in the future; `nbf` and `iat`, if there, not beyond the leeway.
    /// Returns `exp`.
    fn check_times(&self, now: i64) -> Result<i64, AuthError> {
        let exp = self
            .exp
            .as_ref()
            .ok_or(AuthError::NoExpiry)
            .and_then(|n| seconds(n).ok_or(AuthError::BadClaim("exp")))?;
        if exp <= now {
            return Err(AuthError::Expired {
                at: crate::rfc3339::secs_text(exp),
            });
        }
        if let Some(nbf) = &self.nbf {
            let nbf = seconds(nbf).ok_or(AuthError::BadClaim("nbf"))?;
            if nbf > now + LEEWAY_SECS {
                return Err(AuthError::NotYetValid {
                    claim: "nbf",
                    at: crate::rfc3339::secs_text(nbf),
                });
            }
        }
        if let Some(iat) = &self.iat {
            let iat = seconds(iat).ok_or(AuthError::BadClaim("iat"))?;
            if iat > now + LEEWAY_SECS {
                return Err(AuthError::NotYetValid {
                    claim: "iat",
                    at: crate::rfc3339::secs_text(iat),
                });
            }
        }
        Ok(exp)
    }
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
fn parse_subject(sub: &str) -> Result<(&str, &str), AuthError> {
    let bad = || AuthError::BadSubject(crate::untrusted::claim(sub));
    let rest = sub.strip_prefix("system:serviceaccount:").ok_or_else(bad)?;
    let (ns, sa) = rest.split_once(':').ok_or_else(bad)?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return Err(bad());
    }
    Ok((ns, sa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn policy() -> ClaimPolicy {
        ClaimPolicy {
            issuer: "https://kubernetes.default.svc".into(),
            audiences: vec!["istio-ca".into()],
        }
    }

    fn good() -> serde_json::Value {
        json!({
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:shop:web",
            "aud": ["api", "istio-ca"],
            "exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10,
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": "web", "uid": "u1"},
                "pod": {"name": "web-1", "uid": "p1"},
                "node": {"name": "node-a", "uid": "n1"}
            }
        })
    }

    fn check(v: serde_json::Value) -> Result<ServiceAccount, AuthError> {
        serde_json::from_value::<Claims>(v)
            .unwrap()
            .check(&policy(), NOW)
    }

    #[test]
    fn accepts_a_projected_token() {
        let sa = check(good()).unwrap();
        assert_eq!(sa.namespace, "shop");
        assert_eq!(sa.name, "web");
        assert_eq!(sa.pod_name.as_deref(), Some("web-1"));
        assert_eq!(sa.pod_uid.as_deref(), Some("p1"));
        assert_eq!(sa.node_name.as_deref(), Some("node-a"));
        let mut single_aud = good();
        single_aud["aud"] = json!("istio-ca");
        check(single_aud).unwrap();
        let mut fractional = good();
        fractional["exp"] = json!((NOW + 60) as f64 + 0.5);
        check(fractional).unwrap();
    }

    #[test]
    fn each_rule_has_its_own_message() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("iss", json!("https://other"), "issuer \"https://other\""),
            (
                "aud",
                json!(["api"]),
                "audience [api] does not include istio-ca",
            ),
            (
                "exp",
                json!(NOW - 1),
                "token expired at 2027-01-15T07:59:59Z",
            ),
            ("nbf", json!(NOW + 120), "not valid before"),
            ("iat", json!(NOW + 120), "iat"),
            (
                "sub",
                json!("system:node:n1"),
                "system:serviceaccount:<namespace>:<name>",
            ),
            (
                "sub",
                json!("system:serviceaccount:shop"),
                "system:serviceaccount:<namespace>:<name>",
            ),
            (
                "sub",
                json!("system:serviceaccount:other:web"),
                "kubernetes.io",
            ),
        ];
        for (claim, value, want) in cases {
            let mut v = good();
            v[claim] = value;
            let err = check(v).unwrap_err().to_string();
            assert!(err.contains(want), "{claim}: {err}");
        }
        let mut no_exp = good();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(check(no_exp).unwrap_err().to_string().contains("no exp"));
        let mut no_aud = good();
        no_aud.as_object_mut().unwrap().remove("aud");
        assert!(
            check(no_aud)
                .unwrap_err()
                .to_string()
                .contains("audience [] does not include")
        );
        // Within the leeway, a slightly early nbf/iat is fine.
        let mut skewed = good();
        skewed["iat"] = json!(NOW + 30);
        skewed["nbf"] = json!(NOW + 30);
        check(skewed).unwrap();
        // kubernetes.io service account disagreeing with sub.
        let mut sa = good();
        sa["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
        assert!(check(sa).unwrap_err().to_string().contains("shop/admin"));
    }
}

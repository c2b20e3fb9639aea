//! Diagnosis: what an operator needs when mTLS breaks. `explain` maps pasted error texts to the layer that failed and the commands
//! that confirm it; `inspect` reads a chain, a bundle or a CSR against what the CA knows;
//! `check` shakes hands with a peer and says which layer failed.

use serde::Serialize;

pub mod check;

pub mod explain;
pub mod inspect;

/// The layers an operator walks when mTLS breaks, outermost first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// Reaching the peer at all: DNS, TCP, a proxy in the way.
    Transport,
    /// The TLS handshake itself: versions, ALPN, a client certificate asked for.
    Tls,
    /// Whose roots are trusted: the bundle, a rotation one side has not seen.
    Trust,
    /// Validity periods: expired, not yet valid, clocks.
    Expiry,
    /// The SPIFFE ID: the SAN, the trust domain, authorization policies.
    Identity,
    /// The service-account token sent to the CA.
    Token,
    /// The request to the CA: the CSR, the TTL.
    Request,
    /// The CA itself: its authority, its store.
    Ca,
    /// A certificate's profile: key usages, basic constraints, key strength.
    Profile,
    /// How a chain's links fit: signatures, issuers.
    Chain,
}

impl Layer {
    /// Its name, as printed and in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::Tls => "tls",
            Self::Trust => "trust",
            Self::Expiry => "expiry",
            Self::Identity => "identity",
            Self::Token => "token",
            Self::Request => "request",
            Self::Ca => "ca",
            Self::Profile => "profile",
            Self::Chain => "chain",
        }
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem: the layer that fails and what to do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Which layer fails.
    pub layer: Layer,
    /// What is wrong and what to do.
    pub message: String,
}

/// What a diagnosis found: what holds and what fails.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Findings {
    /// What holds, one line each.
    pub facts: Vec<String>,
    /// What fails, by layer.
    pub problems: Vec<Problem>,
}

impl Findings {
    /// Records a problem of `layer`.
    pub fn problem(&mut self, layer: Layer, message: impl Into<String>) {
        self.problems.push(Problem {
            layer,
            message: message.into(),
        });
    }

    /// Success when nothing failed: the exit status of `inspect` and `check`.
    pub fn exit_code(&self) -> std::process::ExitCode {
        if self.problems.is_empty() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }
}

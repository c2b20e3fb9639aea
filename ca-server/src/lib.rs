#![warn(missing_docs, unreachable_pub)]
//! ca-server: a certificate authority for service meshes. A proxy sends a CSR over gRPC with
//! its Kubernetes service-account token; the server checks the token, mints a short-lived
//! SPIFFE certificate under the mesh's root, records the decision in a hash-chained audit log,
//! and only then answers with the chain.
//!
//! The modules are the nouns of the domain; data flows one way through them: `server` calls
//! `auth`, `issuance` and `audit`; `issuance` calls `authority`; everything persistent goes
//! through `store`. See ARCHITECTURE.md.

pub mod agent;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod bundle;
pub mod class;
pub mod cli;
pub mod diagnose;
pub mod files;
pub mod issuance;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod rfc3339;
pub mod server;
pub mod spiffe;
pub mod store;
pub mod untrusted;
pub mod x509;

pub use spiffe::{SpiffeId, TrustDomain};

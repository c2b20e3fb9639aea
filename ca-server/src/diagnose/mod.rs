//! Diagnosis: what an operator needs when mTLS breaks. `expiry` finds authorities close to
//! their end; `explain` maps pasted error texts to the layer that failed and the commands
//! that confirm it; `inspect` reads a chain, a bundle or a CSR against what the CA knows;
//! `check` shakes hands with a peer and says which layer failed.

pub mod check;
pub mod expiry;
pub mod explain;
pub mod inspect;

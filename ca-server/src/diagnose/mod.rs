//! Diagnosis: what an operator needs when mTLS breaks. `expiry` finds authorities close to
//! their end; `explain` maps pasted error texts to the layer that failed and the commands
//! that confirm it; `inspect` reads a chain, a bundle or a CSR against what the CA knows;
//! `check` shakes hands with a peer and says which layer failed.

use serde::Serialize;

pub mod check;
pub mod expiry;
pub mod explain;
pub mod inspect;

/// One problem: the layer that fails and what to do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// `transport`, `tls`, `expiry`, `identity`, `trust`, `profile` or `chain`.
    pub layer: &'static str,
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
    pub fn problem(&mut self, layer: &'static str, message: impl Into<String>) {
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

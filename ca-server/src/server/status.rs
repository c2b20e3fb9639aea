//! The one place where a classed error becomes a gRPC status.

use tonic::{Code, Status};

use crate::class::{Class, Classify};

/// The longest message a refusal sends back.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// The tonic code of `class` ([`Class::code`] says which).
pub fn code(class: Class) -> Code {
    Code::from_i32(class.code().number)
}

/// The status sent to the caller for `error`: its class's code and its message, nothing
/// secret, and never more than [`MAX_MESSAGE_BYTES`] of it (the parts a caller sent are cut
/// already).
pub fn to_status(error: &impl Classify) -> Status {
    Status::new(
        code(error.class()),
        crate::untrusted::cut(&error.to_string(), MAX_MESSAGE_BYTES),
    )
}

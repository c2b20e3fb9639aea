//! How a failure is classed for whoever answers the caller. Each domain error says its
//! [`Class`] and a stable reason key ([`Classify`]); [`Class::code`] is the one place a class
//! becomes a gRPC status code, so that a new refusal reason is one `match` arm in its own
//! error type and nothing else.

/// What kind of failure it is, as the caller should read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// The request itself is wrong (a bad CSR, TTL or filter): fix it, do not retry as is.
    Caller,
    /// The caller is who it says but may not have this.
    Forbidden,
    /// The caller's credential did not check out.
    Unauthenticated,
    /// Too much at once, from this caller or in all: retry later.
    Overloaded,
    /// Something the server depends on is away: retry.
    Unavailable,
    /// Not the caller's doing: a bug or a broken authority. Someone must look.
    Internal,
    /// The caller's deadline passed before the answer was ready.
    Deadline,
}

/// A gRPC status code: its number on the wire and the name the audit log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcCode {
    /// The code's number (`grpc-status`).
    pub number: i32,
    /// The code's name, e.g. `UNAUTHENTICATED`.
    pub name: &'static str,
}

impl GrpcCode {
    /// `INVALID_ARGUMENT`.
    pub const INVALID_ARGUMENT: Self = Self::new(3, "INVALID_ARGUMENT");
    /// `DEADLINE_EXCEEDED`.
    pub const DEADLINE_EXCEEDED: Self = Self::new(4, "DEADLINE_EXCEEDED");
    /// `PERMISSION_DENIED`.
    pub const PERMISSION_DENIED: Self = Self::new(7, "PERMISSION_DENIED");
    /// `RESOURCE_EXHAUSTED`.
    pub const RESOURCE_EXHAUSTED: Self = Self::new(8, "RESOURCE_EXHAUSTED");
    /// `INTERNAL`.
    pub const INTERNAL: Self = Self::new(13, "INTERNAL");
    /// `UNAVAILABLE`.
    pub const UNAVAILABLE: Self = Self::new(14, "UNAVAILABLE");
    /// `UNAUTHENTICATED`.
    pub const UNAUTHENTICATED: Self = Self::new(16, "UNAUTHENTICATED");

    const fn new(number: i32, name: &'static str) -> Self {
        Self { number, name }
    }
}

impl Class {
    /// The gRPC code a caller is answered with (DESIGN.md's error table).
    pub const fn code(self) -> GrpcCode {
        match self {
            Self::Caller => GrpcCode::INVALID_ARGUMENT,
            Self::Forbidden => GrpcCode::PERMISSION_DENIED,
            Self::Unauthenticated => GrpcCode::UNAUTHENTICATED,
            Self::Overloaded => GrpcCode::RESOURCE_EXHAUSTED,
            Self::Unavailable => GrpcCode::UNAVAILABLE,
            Self::Internal => GrpcCode::INTERNAL,
            Self::Deadline => GrpcCode::DEADLINE_EXCEEDED,
        }
    }
}

/// An error that says how it is classed.
pub trait Classify: std::error::Error {
    /// Its class.
    fn class(&self) -> Class;

    /// The check that failed, as a short fixed key: a metric label, part of how refusals are
    /// counted together, never anything the caller sent.
    fn reason(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_has_its_own_code() {
        let all = [
            Class::Caller,
            Class::Forbidden,
            Class::Unauthenticated,
            Class::Overloaded,
            Class::Unavailable,
            Class::Internal,
            Class::Deadline,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(Class::Unauthenticated.code().number, 16);
        assert_eq!(Class::Overloaded.code().name, "RESOURCE_EXHAUSTED");
    }
}

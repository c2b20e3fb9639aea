//! The audit log: every decision is one event, committed (in groups) before the answer goes
//! out, and hash-chained so that `audit verify` finds any edit, removal or reordering.

mod chain;
mod log;

pub use chain::{VerifyReport, verify_chain};
pub use log::{AuditError, AuditLog};

/// The OS user behind a change, for authority events: `$USER`, else `$LOGNAME`, else the uid.
pub fn operator_name() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var)
            && !name.is_empty()
        {
            return name;
        }
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| {
                    uids.split_whitespace()
                        .next()
                        .map(|uid| format!("uid {uid}"))
                })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

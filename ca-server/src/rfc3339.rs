//! Times as the store keeps them (unix seconds and milliseconds) and as people read them:
//! RFC 3339, the one text format of messages, logs, the audit commands and the gRPC services.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `t` in unix milliseconds (saturating far outside any date a certificate carries).
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Now, in unix milliseconds.
pub fn now_unix_ms() -> i64 {
    unix_ms(OffsetDateTime::now_utc())
}

/// `t` as RFC 3339 (UTC), for messages and logs: `2026-12-02T03:41:55Z`, never the `time`
/// crate's own `2026-12-02 3:41:55.0 +00:00:00`.
pub fn text(t: OffsetDateTime) -> String {
    secs_text(t.unix_timestamp())
}

/// Unix seconds as RFC 3339 (UTC, whole seconds), if representable.
pub fn from_secs(secs: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Unix milliseconds as RFC 3339 (UTC, always three fractional digits), if representable.
pub fn from_millis(ms: i64) -> Option<String> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
}

/// Unix seconds as RFC 3339, or `unix time N` if out of range: for messages.
pub fn secs_text(secs: i64) -> String {
    from_secs(secs).unwrap_or_else(|| format!("unix time {secs}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::secs_text(1_800_000_000), "2027-01-15T08:00:00Z");
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_007_000_000).unwrap();
        assert_eq!(super::unix_ms(t), 1_800_000_000_007);
        assert_eq!(super::text(t), "2027-01-15T08:00:00Z");
        assert_eq!(
            super::from_millis(1_800_000_000_007).unwrap(),
            "2027-01-15T08:00:00.007Z"
        );
        assert_eq!(
            super::secs_text(i64::MAX),
            format!("unix time {}", i64::MAX)
        );
    }
}

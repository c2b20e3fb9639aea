//! Text a peer controls (a claimed identity, a token's claims, a CSR's SANs) on its way into a
//! message, a record, a log line or a terminal: control characters escaped, and cut to a size
//! that no peer can inflate.

use std::borrow::Cow;
use std::fmt::Write;

/// The most bytes of one claimed value (an `ImpersonatedIdentity`, a token's `iss`) kept.
pub const CLAIM_BYTES: usize = 256;

/// The most bytes of a refusal's reason kept in the audit log.
pub const REASON_BYTES: usize = 512;

/// Whether `c` must not reach a terminal or a spreadsheet as itself: C0 and C1 controls, DEL,
/// and the Unicode controls that reorder or hide text (bidirectional overrides and isolates,
/// zero-width characters, the BOM).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// `text` with every unsafe character written as `\u{…}` and every backslash doubled, so the
/// result prints as one line of plain text and reads back unambiguously.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\' || is_unsafe(c)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        c if is_unsafe(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Text of several lines for a terminal: each line [`escape`]d, the line breaks kept.
pub fn escape_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape(line));
    }
    out
}

/// [`escape`]d `text`, cut to at most `max` bytes between two characters (never inside an
/// escape); a cut value ends in `…` (within the limit) so that a reader knows there was more.
pub fn cut(text: &str, max: usize) -> String {
    const MORE: &str = "…";
    let escaped = escape(text);
    if escaped.len() <= max {
        return escaped.into_owned();
    }
    let Some(budget) = max.checked_sub(MORE.len()) else {
        return String::new();
    };
    let mut out = String::with_capacity(max);
    let mut one = String::new();
    for c in text.chars() {
        one.clear();
        push_escaped(&mut one, c);
        if out.len() + one.len() > budget {
            break;
        }
        out.push_str(&one);
    }
    out.push_str(MORE);
    out
}

/// A claimed value for a message or a record: [`cut`] to [`CLAIM_BYTES`].
pub fn claim(text: &str) -> String {
    cut(text, CLAIM_BYTES)
}

/// A cell for a CSV file that a spreadsheet may open: a value that would start a formula
/// (`=`, `+`, `-`, `@`, or a tab or carriage return before one) gets a leading `'`, so it is
/// shown as text rather than evaluated.
pub fn csv_safe(cell: &str) -> Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => Cow::Owned(format!("'{cell}")),
        _ => Cow::Borrowed(cell),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_plain_text_is_untouched() {
        assert!(matches!(
            escape("spiffe://cluster.local/ns/a/sa/b"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape("a\u{1b}[31mred\n"), "a\\u{1b}[31mred\\u{a}");
        assert_eq!(escape("tab\there"), "tab\\u{9}here");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("\u{202e}evil"), "\\u{202e}evil");
        assert_eq!(escape("\u{9b}csi"), "\\u{9b}csi");
        assert_eq!(escape("ünïcödé ✓"), "ünïcödé ✓");
    }

    #[test]
    fn lines_keep_their_breaks_and_lose_their_controls() {
        assert_eq!(escape_lines("a\u{1b}[2J\nb\r\n"), "a\\u{1b}[2J\nb\\u{d}\n");
    }

    #[test]
    fn cut_values_stay_within_their_limit() {
        assert_eq!(cut("short", 256), "short");
        let long = "x".repeat(2048);
        let c = cut(&long, 256);
        assert!(c.len() <= 256 && c.ends_with('…'), "{}", c.len());
        // Escapes count against the limit too.
        let escapes = "\u{1b}".repeat(1000);
        let c = cut(&escapes, 256);
        assert!(c.len() <= 256 && c.starts_with("\\u{1b}"), "{c}");
        assert!(!c.contains('\u{1b}'));
        // Never inside a character or an escape.
        let wide = "é".repeat(300);
        assert!(cut(&wide, 255).len() <= 255);
        let mixed = "a\u{1b}".repeat(100);
        let c = cut(&mixed, 20);
        assert_eq!(c, "a\\u{1b}a\\u{1b}a…");
        // Exactly at the limit: kept whole.
        assert_eq!(cut(&"y".repeat(256), 256), "y".repeat(256));
        assert_eq!(cut("", 0), "");
        assert_eq!(cut("abc", 1), "");
    }

    #[test]
    fn csv_cells_never_start_a_formula() {
        for bad in ["=1+1", "+1", "-2", "@SUM(A1)", "\t=x", "\r=x"] {
            assert!(csv_safe(bad).starts_with('\''), "{bad}");
        }
        assert_eq!(csv_safe("spiffe://a/b"), "spiffe://a/b");
        assert_eq!(csv_safe(""), "");
    }
}

//! Edge validation of text: what every string a client sends must satisfy
//! before it reaches a handler's logic or Postgres.
//!
//! Two layers, so that no input can reach the database as something it
//! refuses (Postgres text cannot hold U+0000: it answered 500s) and no
//! reader sees something other than what was stored:
//!
//! - the middleware ([`crate::middleware`]) refuses, for every request, a
//!   URI whose decoded path or query holds a control character
//!   ([`check_uri`]), and a JSON body with a duplicate object key or a
//!   U+0000 anywhere ([`crate::json_body::check_json_body`]) — a proxy or a log that reads
//!   the first of two `base_amount`s must not see another amount than the
//!   server, which with serde would take the last;
//! - handlers check each field for its meaning with [`check_text`]: a
//!   single-line name (queue, kind, asset code, filter) holds no control,
//!   bidi or invisible character at all; prose (a `reason`) may hold tabs
//!   and line breaks but nothing else of the kind. Both have a length bound.
//!
//! Each refusal is a 400 `validation` problem naming the field, never the
//! offending text (it may be unprintable).
use crate::error::{Error, Result};

/// What a text field is for, which decides the characters it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// A name or a filter: one line of visible characters.
    Line,
    /// Human prose (a reason): may also hold tabs and line breaks.
    Prose,
}

/// Characters that change how the text around them is displayed without
/// showing themselves: bidi embeddings, overrides, isolates and marks. An
/// address written `bc1q\u{202e}lacol-kcatta` reads `bc1qattack-local`.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Characters that take no room on screen: zero-width spaces and joiners,
/// the word joiner and invisible operators, the byte-order mark, the soft
/// hyphen, and the other Unicode "default ignorable" format characters.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{206A}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// Checks one text field: no U+0000 or other control character (prose may
/// hold `\t`, `\n`, `\r`), no bidi control, no invisible character in a
/// [`TextKind::Line`], and at most `max_chars` characters.
pub fn check_text(field: &str, value: &str, max_chars: usize, kind: TextKind) -> Result<()> {
    let mut count = 0usize;
    for c in value.chars() {
        count += 1;
        let allowed_control = kind == TextKind::Prose && matches!(c, '\t' | '\n' | '\r');
        if c.is_control() && !allowed_control {
            return Err(Error::Validation(format!(
                "{field} may not contain control characters"
            )));
        }
        if is_bidi_control(c) {
            return Err(Error::Validation(format!(
                "{field} may not contain bidirectional control characters"
            )));
        }
        if kind == TextKind::Line && is_invisible(c) {
            return Err(Error::Validation(format!(
                "{field} may not contain invisible characters"
            )));
        }
    }
    if count > max_chars {
        return Err(Error::Validation(format!(
            "{field} must be at most {max_chars} characters"
        )));
    }
    Ok(())
}

/// Refuses a request URI whose percent-decoded path or query holds a
/// control character (C0, DEL or C1). No path parameter or query filter of
/// either API has a use for one.
pub fn check_uri(uri: &poem::http::Uri) -> Result<()> {
    let parts = [("path", uri.path()), ("query", uri.query().unwrap_or(""))];
    for (what, raw) in parts {
        let bytes = percent_decode(raw);
        if bytes.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(Error::Validation(format!(
                "the URL's {what} may not contain control characters"
            )));
        }
        // C1 controls (U+0080..=U+009F) are two bytes in UTF-8.
        if String::from_utf8_lossy(&bytes)
            .chars()
            .any(char::is_control)
        {
            return Err(Error::Validation(format!(
                "the URL's {what} may not contain control characters"
            )));
        }
    }
    Ok(())
}

/// `%XX` sequences decoded (a malformed one is kept as it is; `+` is left
/// alone: it is not a control character either way).
fn percent_decode(raw: &str) -> Vec<u8> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_refuse_controls_bidi_and_invisibles() {
        let ok = |v: &str| check_text("f", v, 10, TextKind::Line).is_ok();
        assert!(ok("payments") && ok("") && ok("zürich"));
        for bad in [
            "a\0b",
            "a\u{7}",
            "a\nb",
            "a\u{85}",
            "bc1q\u{202e}x",
            "a\u{2066}b",
            "a\u{200b}b",
            "\u{feff}a",
            "elevenchars",
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn prose_keeps_line_breaks_only() {
        let ok = |v: &str| check_text("reason", v, 100, TextKind::Prose).is_ok();
        assert!(ok("line one\nline two\r\n\tindented"));
        assert!(ok("family: 👨\u{200d}👩"));
        assert!(!ok("nul\0"));
        assert!(!ok("bell\u{7}"));
        assert!(!ok("esc\u{1b}[31m"));
        assert!(!ok("rlo\u{202e}"));
    }

    #[test]
    fn uris_with_encoded_controls_are_refused() {
        let uri = |s: &str| s.parse::<poem::http::Uri>().unwrap_or_default();
        assert!(check_uri(&uri("/v1/jobs?q=a%20b&queue=x+y")).is_ok());
        assert!(check_uri(&uri("/v1/jobs?q=%C3%BC")).is_ok());
        assert!(check_uri(&uri("/v1/jobs?q=%00")).is_err());
        assert!(check_uri(&uri("/v1/jobs?q=%1b")).is_err());
        assert!(check_uri(&uri("/v1/jobs?q=%7F")).is_err());
        assert!(check_uri(&uri("/v1/jobs?q=%C2%85")).is_err());
        assert!(check_uri(&uri("/v1/queues/a%00b/pause")).is_err());
        assert!(check_uri(&uri("/v1/jobs?q=%")).is_ok());
    }
}

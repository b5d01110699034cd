//! Text airlock prints: errors as one line, guest text made safe for a
//! terminal.

/// An error and its sources, as one line: `what: cause: cause`.
pub fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Makes guest-controlled text safe to print on a terminal inside one of
/// our own lines: control characters (escape sequences) and bidirectional
/// overrides are shown escaped. Drops the `\r` of serial `\r\n` endings.
/// (The command's own output is passed through untouched: it is the data
/// the user asked for.)
pub fn sanitize(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\t') || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_terminal_controls() {
        assert_eq!(sanitize(b"airlock-init: ready\r"), "airlock-init: ready");
        assert_eq!(sanitize(b"a\tb"), "a\tb");
        assert_eq!(sanitize(b"\x1b[2Jhi"), "\\u{1b}[2Jhi");
        assert_eq!(sanitize("x\u{202e}y".as_bytes()), "x\\u{202e}y");
        assert_eq!(sanitize(b"bad \xff utf8"), "bad \u{fffd} utf8");
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
    }
}

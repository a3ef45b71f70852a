//! Showing text nobody vouches for (file names, URLs, what a guest or a server said) inside
//! taskvm's own messages: cut to a bounded length and with control characters escaped, so a
//! quote can neither flood a log nor steer a terminal.

use std::fmt;

/// Most characters of untrusted text shown in one quote.
pub const MAX_SHOWN_CHARS: usize = 200;

/// `text` in double quotes, at most [`MAX_SHOWN_CHARS`] characters of it followed by `…`
/// when cut, with quotes, backslashes and control characters (C0, DEL, C1, and the
/// bidirectional overrides) escaped.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// Raw bytes shown as [`quoted`] shows text, invalid UTF-8 replaced.
pub fn quoted_bytes(bytes: &[u8]) -> String {
    // Only a prefix is ever shown: decode no more than needed.
    let prefix = &bytes[..bytes.len().min(MAX_SHOWN_CHARS * 4 + 4)];
    let text = String::from_utf8_lossy(prefix);
    let mut shown = quoted(&text).to_string();
    if prefix.len() < bytes.len() && !shown.ends_with("…\"") {
        shown.insert(shown.len() - 1, '…');
    }
    shown
}

/// Text without quotes, escaped and cut like [`quoted`]: for a line a guest sent.
pub fn escaped(text: &str) -> String {
    let mut out = String::new();
    write_escaped(&mut out, text).ok();
    out
}

/// `text` whole, with control characters escaped as [`quoted`] escapes them (quotes and
/// backslashes left alone): for a line of taskvm's own that must stay one line.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The [`fmt::Display`] of [`quoted`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        write_escaped(f, self.0)?;
        f.write_str("\"")
    }
}

fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for (count, c) in text.chars().enumerate() {
        if count == MAX_SHOWN_CHARS {
            return out.write_char('…');
        }
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if needs_escape(c) => write!(out, "\\u{{{:x}}}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// Control characters and the invisible ones that reorder or hide text.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded_and_escaped() {
        assert_eq!(quoted("disk.img").to_string(), "\"disk.img\"");
        assert_eq!(
            quoted("a\u{1b}[2J\"b\\\n").to_string(),
            "\"a\\u{1b}[2J\\\"b\\\\\\n\""
        );
        assert_eq!(quoted("x\u{202e}y").to_string(), "\"x\\u{202e}y\"");
        let long = "a".repeat(3_000_000);
        let shown = quoted(&long).to_string();
        assert_eq!(shown.chars().count(), MAX_SHOWN_CHARS + 3);
        assert!(shown.ends_with("…\""));
        let bytes = quoted_bytes(&vec![b'z'; 1 << 20]);
        assert!(bytes.len() < 1024 && bytes.ends_with("…\""), "{bytes}");
        assert_eq!(quoted_bytes(b"ok\xff"), "\"ok\u{fffd}\"");
        assert_eq!(escaped("\u{7}bell"), "\\u{7}bell");
    }
}

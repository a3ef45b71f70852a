//! Rule violations found in a document, each located by a JSON pointer.

use std::fmt;

use thiserror::Error;

/// One broken rule: where (a JSON pointer into the document) and what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// JSON pointer (RFC 6901) to the offending value; empty for the whole document.
    pub pointer: String,
    /// The rule, phrased so that `pointer: rule` reads as a sentence.
    pub rule: String,
}

impl Violation {
    /// A violation at `pointer`.
    /// Both parts are cut (a pointer at 300 characters, a rule at 500, with `…`) and their
    /// control characters escaped: they quote the document, which may be hostile.
    pub fn new(pointer: impl Into<String>, rule: impl Into<String>) -> Self {
        Violation {
            pointer: bounded(pointer.into(), MAX_POINTER_CHARS),
            rule: bounded(rule.into(), MAX_RULE_CHARS),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pointer = if self.pointer.is_empty() {
            "<document>"
        } else {
            &self.pointer
        };
        write!(f, "{pointer}: {}", self.rule)
    }
}

/// Most characters of a violation's pointer.
const MAX_POINTER_CHARS: usize = 300;
/// Most characters of a violation's rule.
const MAX_RULE_CHARS: usize = 500;
/// Most violations listed; the rest are counted in one last line.
pub const MAX_LISTED: usize = 100;

fn bounded(text: String, max_chars: usize) -> String {
    let escaped = crate::shown::escape_controls(&text);
    match escaped.char_indices().nth(max_chars) {
        None => escaped.into_owned(),
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
    }
}

/// Every rule a document breaks, sorted by pointer; never empty.
///
/// For a task this is a *malformed payload*: the task cannot run as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// Collects violations; `None` when there are none.
    /// At most [`MAX_LISTED`] are kept, then one line saying how many more there were.
    pub fn from_vec(mut violations: Vec<Violation>) -> Option<Self> {
        violations.sort();
        violations.dedup();
        if violations.len() > MAX_LISTED {
            let more = violations.len() - MAX_LISTED;
            violations.truncate(MAX_LISTED);
            violations.push(Violation::new("", format!("and {more} more violations")));
        }
        (!violations.is_empty()).then_some(Violations(violations))
    }

    /// A single violation.
    pub fn one(pointer: impl Into<String>, rule: impl Into<String>) -> Self {
        Violations(vec![Violation::new(pointer, rule)])
    }

    /// The violations, sorted by pointer.
    pub fn as_slice(&self) -> &[Violation] {
        &self.0
    }

    /// Prefixes every pointer, for a document embedded in another one.
    pub fn nested_under(self, prefix: &str) -> Self {
        Violations(
            self.0
                .into_iter()
                .map(|v| Violation::new(format!("{prefix}{}", v.pointer), v.rule))
                .collect(),
        )
    }
}

impl fmt::Display for Violations {
    /// One violation per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, violation) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

/// Escapes one JSON pointer reference token (RFC 6901: `~` → `~0`, `/` → `~1`).
pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_documents_make_bounded_violations() {
        let huge = Violation::new(format!("/{}", "k".repeat(1 << 20)), "x".repeat(1 << 20));
        assert!(
            huge.to_string().chars().count() < 900,
            "{}",
            huge.to_string().len()
        );
        let escaped = Violation::new("/a\u{1b}", "bad \u{1b}[2J value");
        assert_eq!(escaped.to_string(), "/a\\u{1b}: bad \\u{1b}[2J value");
        let many = (0..1000)
            .map(|index| Violation::new(format!("/f{index:04}"), "unknown field"))
            .collect();
        let listed = Violations::from_vec(many).unwrap();
        assert_eq!(listed.as_slice().len(), MAX_LISTED + 1);
        assert!(listed
            .to_string()
            .ends_with("<document>: and 900 more violations"));
    }
}

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
    pub fn new(pointer: impl Into<String>, rule: impl Into<String>) -> Self {
        Violation {
            pointer: pointer.into(),
            rule: rule.into(),
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

/// Every rule a document breaks, sorted by pointer; never empty.
///
/// For a task this is a *malformed payload*: the task cannot run as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// Collects violations; `None` when there are none.
    pub fn from_vec(mut violations: Vec<Violation>) -> Option<Self> {
        violations.sort();
        violations.dedup();
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

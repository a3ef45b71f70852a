//! Prometheus' text exposition format, written one metric family at a time.

use std::fmt::{Display, Write};

/// A `/metrics` answer under construction.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self
    }

    /// One sample: `series` is the name with its labels, e.g. `taskvm_tasks{state="queued"}`.
    pub fn sample(&mut self, series: &str, value: impl Display) -> &mut Self {
        let _ = writeln!(self.text, "{series} {value}");
        self
    }

    /// The finished text.
    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_its_help_type_and_samples() {
        let mut out = Exposition::default();
        out.family("jobs", "gauge", "Jobs.")
            .sample("jobs{kind=\"a\"}", 2)
            .sample("jobs{kind=\"b\"}", 0.5);
        assert_eq!(
            out.into_text(),
            "# HELP jobs Jobs.\n# TYPE jobs gauge\njobs{kind=\"a\"} 2\njobs{kind=\"b\"} 0.5\n"
        );
    }
}

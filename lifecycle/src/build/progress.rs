//! Progress lines of a build's long stages on standard error: how long the boot and the build
//! have run (while they are quiet), and how far flattening and compressing are, with sizes
//! and rates — at most one line every [`EVERY`] per stage.

use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use image_manager::PackProgress;

/// The least time between two progress lines of one stage.
const EVERY: Duration = Duration::from_secs(2);

/// Turns packaging progress into lines.
pub struct PackagingReport<'a> {
    say: &'a (dyn Fn(&str) + Sync),
    state: Mutex<ReportState>,
}

struct ReportState {
    stage_started: Instant,
    last_line: Option<Instant>,
    stage: &'static str,
}

impl<'a> PackagingReport<'a> {
    /// A report that prints through `say`.
    pub fn new(say: &'a (dyn Fn(&str) + Sync)) -> Self {
        PackagingReport {
            say,
            state: Mutex::new(ReportState {
                stage_started: Instant::now(),
                last_line: None,
                stage: "",
            }),
        }
    }

    /// Takes one progress event; prints a line when one is due.
    pub fn observe(&self, event: PackProgress) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (stage, done, total, extra) = match event {
            PackProgress::Flattening { done, total } => ("flattening", done, total, String::new()),
            PackProgress::Compressing {
                done,
                total,
                written,
            } => (
                "compressing",
                done,
                total,
                format!(", {} MB written", written / 1_000_000),
            ),
        };
        let now = Instant::now();
        if state.stage != stage {
            state.stage = stage;
            state.stage_started = now;
            state.last_line = None;
        }
        // A stage quicker than EVERY prints nothing; the summary after packaging says it all.
        let since = state.last_line.unwrap_or(state.stage_started);
        if now.duration_since(since) < EVERY {
            return;
        }
        state.last_line = Some(now);
        (self.say)(&line(stage, done, total, now - state.stage_started, &extra));
    }
}

fn line(stage: &str, done: u64, total: u64, took: Duration, extra: &str) -> String {
    let percent = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let rate = done as f64 / took.as_secs_f64().max(0.001) / 1e6;
    format!(
        "{stage}: {} of {} MB ({percent:.0} %), {rate:.0} MB/s{extra}",
        done / 1_000_000,
        total / 1_000_000
    )
}

/// A line every `every` while a quiet stage runs: "still booting (30 s)". Never returns: race
/// it against the stage.
pub async fn tick(say: &(dyn Fn(&str) + Sync), what: &str, every: Duration) -> Infallible {
    let started = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        say(&format!("{what} ({} s)", started.elapsed().as_secs()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_sizes_percent_and_rate() {
        let text = line(
            "flattening",
            500_000_000,
            2_000_000_000,
            Duration::from_secs(5),
            "",
        );
        assert_eq!(text, "flattening: 500 of 2000 MB (25 %), 100 MB/s");
    }

    #[test]
    fn a_quick_stage_prints_nothing_and_a_slow_one_a_line_per_interval() {
        let lines = Mutex::new(Vec::new());
        let say = |line: &str| lines.lock().expect("lock").push(line.to_owned());
        let report = PackagingReport::new(&say);
        for done in [10u64, 20, 30] {
            report.observe(PackProgress::Flattening {
                done: done << 20,
                total: 100 << 20,
            });
        }
        assert!(lines.lock().expect("lock").is_empty());
        if let Ok(mut state) = report.state.lock() {
            state.stage_started -= EVERY;
        }
        for done in [40u64, 50] {
            report.observe(PackProgress::Flattening {
                done: done << 20,
                total: 100 << 20,
            });
        }
        let lines = lines.into_inner().expect("lock");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("flattening: 41 of 104 MB (40 %)"),
            "{lines:?}"
        );
    }
}

//! The command's own log on standard error, through `tracing`: one line per event,
//! `PREFIX: MESSAGE` for people (`--log-format text`, the default: `taskvm serve: listening
//! on …`), or one JSON object per event for log shippers (`--log-format json`), carrying the
//! spans it happened in (a task's `task_id` and `run_id`, a VM's name). A task's own log
//! (`live.log`, and `taskvm run`'s output) is not this log.

use std::fmt;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How the command's log is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `taskvm: MESSAGE` lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message, and the spans with their fields.
    Json,
}

/// Sends the process's events to standard error in `format`; text lines start with `prefix`
/// (`taskvm`, `taskvm serve`, `taskvm worker`). A write that fails (standard error closed by
/// a supervisor gone) is dropped, never a panic.
pub fn init(format: LogFormat, prefix: &'static str) {
    // Only taskvm's own crates speak here: a dependency's events are not the user's business.
    let ours = Targets::new().with_targets(
        [
            "taskvm",
            "lifecycle",
            "serve",
            "taskcluster_provider",
            "engine",
            "image_manager",
        ]
        .map(|target| (target, LevelFilter::INFO)),
    );
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A failed write is dropped: the default would report it with `eprintln!`, which
        // panics when standard error is the thing that failed.
        .log_internal_errors(false)
        .with_max_level(LevelFilter::INFO);
    let installed = match format {
        LogFormat::Text => builder
            .event_format(Prefixed { prefix })
            .finish()
            .with(ours)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .finish()
            .with(ours)
            .try_init(),
    };
    // Only a second call fails (a test harness that installed one first): keep the first.
    drop(installed);
}

/// `PREFIX: MESSAGE` (then any other fields of the event as `key=value`).
struct Prefixed {
    prefix: &'static str,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}: ", self.prefix)?;
        context.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

//! Which machine a task's VM gets: the layers of definitions and their order.

use crate::limits::MachineLimits;
use crate::machine::Machine;
use crate::sizing::{apply_limits, LimitError, ResolvedMachine};
use crate::violations::Violations;

/// The machine definitions that apply to one task, highest precedence first.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineLayers<'a> {
    /// The payload's `machine`.
    pub payload: Option<&'a Machine>,
    /// The image's `machine.json`.
    pub image: Option<&'a Machine>,
    /// The worker configuration's `machine`.
    pub worker: Option<&'a Machine>,
}

/// Resolves a task's machine. This is the only place the precedence is written down:
///
/// 1. the payload's `machine`, then
/// 2. the image's `machine.json`, then
/// 3. the worker configuration's `machine`, then
/// 4. [`Machine::builtin_defaults`];
///
/// each field from the highest layer that sets it; then [`apply_limits`] with the worker's
/// limits fills memory and CPU counts and refuses what exceeds them.
pub fn resolve_machine(
    layers: MachineLayers<'_>,
    limits: &MachineLimits,
) -> Result<ResolvedMachine, LimitError> {
    let merged = [layers.payload, layers.image, layers.worker]
        .into_iter()
        .flatten()
        .rev()
        .fold(Machine::builtin_defaults(), |defaults, layer| {
            layer.with_defaults(&defaults)
        });
    apply_limits(&merged, limits)
}

/// A limits error as a violation located under `machine_pointer` (e.g. `/machine`).
pub fn limit_violation(error: &LimitError, machine_pointer: &str) -> Violations {
    let pointer = match error.field() {
        Some(field) => format!("{machine_pointer}/{field}"),
        None => machine_pointer.to_owned(),
    };
    Violations::one(pointer, error.to_string())
}

//! `taskvm validate`: check a payload (or machine definition, or configuration) without
//! running anything.

use std::path::Path;

use schemas::{
    limit_violation, migrate_machine_definition, parse_config, parse_payload, resolve_machine,
    MachineLayers, Violations, WorkerConfig,
};

/// Which kind of document `taskvm validate` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValidateKind {
    /// A task payload, including its machine against the configuration's limits.
    Payload,
    /// An image's `machine.json`.
    Machine,
    /// A worker configuration file.
    Config,
}

/// Checks the document at `path`; `config` supplies the limits a payload's machine must fit.
///
/// A payload is checked against its schema, then its own `machine` (over the configuration's
/// machine and the built-in defaults) is sized by the configuration's limits. The image's
/// `machine.json` is not fetched here: it is checked when the task runs.
pub fn validate(path: &Path, kind: ValidateKind, config: &WorkerConfig) -> Result<(), Violations> {
    let value = crate::documents::read_document(path)?;
    match kind {
        ValidateKind::Payload => {
            let payload = parse_payload(&value)?;
            let layers = MachineLayers {
                payload: payload.machine.as_ref(),
                image: None,
                worker: config.machine.as_ref(),
            };
            resolve_machine(layers, &config.limits)
                .map(drop)
                .map_err(|error| limit_violation(&error, "/machine"))
        }
        ValidateKind::Machine => migrate_machine_definition(&value).map(drop),
        ValidateKind::Config => {
            let parsed = parse_config(&value)?;
            match &parsed.machine {
                Some(machine) => resolve_machine(
                    MachineLayers {
                        worker: Some(machine),
                        ..MachineLayers::default()
                    },
                    &parsed.limits,
                )
                .map(drop)
                .map_err(|error| limit_violation(&error, "/machine")),
                None => Ok(()),
            }
        }
    }
}

//! Reading `machine.json` files of any known format version (taskcluster-worker's
//! `MigrateMachineDefinition`).

use serde_json::Value;

use crate::document::{parse_document, DocumentKind};
use crate::machine::{Machine, MACHINE_FORMAT_VERSION};
use crate::violations::Violations;

/// Reads a `machine.json` definition and returns it in the latest format.
///
/// `version` is required. Version 1 (taskcluster-worker's) is the latest: taskvm's additions
/// are additive, so a version-1 file is read as it is. Any other version is refused by name
/// rather than guessed at.
pub fn migrate_machine_definition(definition: &Value) -> Result<Machine, Violations> {
    let Some(object) = definition.as_object() else {
        return Err(Violations::one(
            "",
            "a machine definition must be a JSON object",
        ));
    };
    match object.get("version") {
        None => Err(Violations::one("/version", "required")),
        Some(version) if version.as_u64() == Some(u64::from(MACHINE_FORMAT_VERSION)) => {
            parse_document(DocumentKind::Machine, definition)
        }
        Some(version) => Err(Violations::one(
            "/version",
            format!(
                "unknown machine format version {version}; this taskvm reads version {MACHINE_FORMAT_VERSION}"
            ),
        )),
    }
}

//! Reading the documents a user hands to the CLI: files in JSON (or TOML for configuration),
//! checked by the `schemas` crate.

use std::path::Path;

use schemas::{parse_config, parse_json, Violations, WorkerConfig};

/// Reads a file as JSON, or TOML when its name ends in `.toml`; any failure is a violation
/// naming the file.
pub fn read_document(path: &Path) -> Result<serde_json::Value, Violations> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Violations::one("", format!("cannot read {}: {error}", path.display())))?;
    if path.extension().is_some_and(|ext| ext == "toml") {
        let value: toml::Value = toml::from_str(&text)
            .map_err(|error| Violations::one("", format!("not valid TOML: {}", error.message())))?;
        serde_json::to_value(value)
            .map_err(|error| Violations::one("", format!("cannot convert TOML: {error}")))
    } else {
        parse_json(&text)
    }
}

/// Reads the worker configuration at `path`, or the defaults when there is none.
pub fn load_config(path: Option<&Path>) -> Result<WorkerConfig, Violations> {
    match path {
        Some(path) => parse_config(&read_document(path)?),
        None => Ok(WorkerConfig::default()),
    }
}

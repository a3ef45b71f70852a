//! The documents taskvm reads — payload, machine, limits, config — their JSON Schemas, and
//! parsing that reports *every* broken rule by JSON pointer instead of stopping at the first.
//!
//! The generated JSON Schema is the single source of the structural rules (types, bounds,
//! patterns, unknown fields): a document is checked against it first, and only a document that
//! passes is deserialised. Rules a schema cannot say (unique artifact names) follow.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use schemars::{JsonSchema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::WorkerConfig;
use crate::limits::MachineLimits;
use crate::machine::Machine;
use crate::payload::{is_reserved_artifact_name, Payload, RESERVED_ARTIFACT_NAMES};
use crate::shown::quoted;
use crate::violations::{escape_token, Violation, Violations};

/// A kind of document with a published JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocumentKind {
    /// A task payload ([`Payload`]).
    Payload,
    /// A machine definition ([`Machine`]), as in an image's `machine.json`.
    Machine,
    /// A host's [`MachineLimits`].
    Limits,
    /// A worker configuration file ([`WorkerConfig`]).
    Config,
}

impl DocumentKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [DocumentKind; 4] = [
        DocumentKind::Payload,
        DocumentKind::Machine,
        DocumentKind::Limits,
        DocumentKind::Config,
    ];

    /// Short name used on the command line (`payload`, `machine`, `limits`, `config`).
    pub fn name(self) -> &'static str {
        match self {
            DocumentKind::Payload => "payload",
            DocumentKind::Machine => "machine",
            DocumentKind::Limits => "limits",
            DocumentKind::Config => "config",
        }
    }

    /// File name of the committed schema under `schemas/json/`.
    pub fn schema_file_name(self) -> String {
        format!("{}.schema.json", self.name())
    }

    /// The JSON Schema (draft 2020-12) of this kind.
    pub fn json_schema(self) -> Value {
        match self {
            DocumentKind::Payload => schema_value::<Payload>(),
            DocumentKind::Machine => schema_value::<Machine>(),
            DocumentKind::Limits => schema_value::<MachineLimits>(),
            DocumentKind::Config => schema_value::<WorkerConfig>(),
        }
    }

    /// The JSON Schema as pretty-printed text with a final newline, exactly as committed.
    pub fn schema_text(self) -> String {
        let mut text = serde_json::to_string_pretty(&self.json_schema())
            .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
        text.push('\n');
        text
    }

    fn index(self) -> usize {
        match self {
            DocumentKind::Payload => 0,
            DocumentKind::Machine => 1,
            DocumentKind::Limits => 2,
            DocumentKind::Config => 3,
        }
    }
}

fn schema_value<T: JsonSchema>() -> Value {
    SchemaGenerator::default()
        .into_root_schema_for::<T>()
        .to_value()
}

/// The compiled validator of `kind`, built once per process.
fn validator(kind: DocumentKind) -> Result<&'static Validator, Violations> {
    static VALIDATORS: [OnceLock<Result<Validator, String>>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    VALIDATORS[kind.index()]
        .get_or_init(|| {
            jsonschema::draft202012::new(&kind.json_schema()).map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(|error| {
            Violations::one(
                "",
                format!(
                    "internal error: the {} schema does not compile: {error}",
                    kind.name()
                ),
            )
        })
}

/// Parses JSON text, reporting a syntax error with its line and column.
pub fn parse_json(text: &str) -> Result<Value, Violations> {
    serde_json::from_str(text).map_err(|error| {
        Violations::one(
            "",
            format!(
                "not valid JSON: {} at line {} column {}",
                syntax_error_message(&error),
                error.line(),
                error.column()
            ),
        )
    })
}

fn syntax_error_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

/// Checks `value` against the schema of `kind`, collecting every violation.
pub fn check_structure(kind: DocumentKind, value: &Value) -> Result<(), Violations> {
    let validator = validator(kind)?;
    let mut violations = Vec::new();
    for error in validator.iter_errors(value) {
        describe(&error, &mut violations);
    }
    Violations::from_vec(violations).map_or(Ok(()), Err)
}

/// Checks `value` against the schema of `kind`, then deserialises it.
pub fn parse_document<T: DeserializeOwned>(
    kind: DocumentKind,
    value: &Value,
) -> Result<T, Violations> {
    check_structure(kind, value)?;
    T::deserialize(value).map_err(|error| {
        Violations::one(
            "",
            format!(
                "internal error: passed the {} schema but not deserialisation: {error}",
                kind.name()
            ),
        )
    })
}

/// Parses a task payload: its schema, then the rules a schema cannot express.
pub fn parse_payload(value: &Value) -> Result<Payload, Violations> {
    let payload: Payload = parse_document(DocumentKind::Payload, value)?;
    let mut seen = BTreeSet::new();
    let mut broken = Vec::new();
    for (index, artifact) in payload.artifacts.iter().enumerate() {
        let pointer = format!("/artifacts/{index}/name");
        if is_reserved_artifact_name(&artifact.name) {
            broken.push(Violation::new(
                pointer,
                format!(
                    "artifact name {:?} is taskvm's own (reserved: {})",
                    artifact.name,
                    RESERVED_ARTIFACT_NAMES.join(", ")
                ),
            ));
        } else if !seen.insert(artifact.name.as_str()) {
            broken.push(Violation::new(
                pointer,
                format!("duplicate artifact name {:?}", artifact.name),
            ));
        }
    }
    check_mounts(&payload, &mut broken);
    Violations::from_vec(broken).map_or(Ok(payload), Err)
}

/// The rules of `mounts` a schema cannot express: each a cache or content (with its format),
/// clean guest paths, none inside another, each cache named once.
fn check_mounts(payload: &Payload, broken: &mut Vec<Violation>) {
    let mut paths: Vec<&str> = Vec::new();
    let mut caches = BTreeSet::new();
    for (index, mount) in payload.mounts.iter().enumerate() {
        let at = |field: &str| format!("/mounts/{index}{field}");
        match (&mount.cache, &mount.content, mount.format) {
            (Some(_), Some(_), _) => broken.push(Violation::new(
                at(""),
                "a mount is a cache or content, not both".to_owned(),
            )),
            (None, None, _) => broken.push(Violation::new(
                at(""),
                "a mount needs \"cache\" (a writable cache) or \"content\" (read-only)".to_owned(),
            )),
            (Some(_), None, Some(_)) => broken.push(Violation::new(
                at("/format"),
                "\"format\" belongs to content, not to a cache".to_owned(),
            )),
            (None, Some(_), None) => broken.push(Violation::new(
                at("/format"),
                "content needs its \"format\" (tar.zst, tar.gz or zip)".to_owned(),
            )),
            _ => {}
        }
        let path = mount.path.trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let unclean = path.is_empty()
            || segments
                .iter()
                .any(|segment| segment.is_empty() || *segment == "." || *segment == "..")
            || path.contains('\0');
        let system = ["proc", "sys", "dev"].contains(&segments.first().copied().unwrap_or(""));
        if unclean || system {
            broken.push(Violation::new(
                at("/path"),
                format!(
                    "mount path {} must be absolute, not /, without . or .. or empty segments, \
                     and not below /proc, /sys or /dev",
                    quoted(&mount.path)
                ),
            ));
        } else if let Some(other) = paths.iter().find(|other| {
            path == **other
                || path.starts_with(&format!("{other}/"))
                || other.starts_with(&format!("{path}/"))
        }) {
            broken.push(Violation::new(
                at("/path"),
                format!(
                    "mount path {} overlaps the mount at {}",
                    quoted(&mount.path),
                    quoted(other)
                ),
            ));
        } else {
            paths.push(path);
        }
        if let Some(cache) = &mount.cache {
            if !caches.insert(cache.as_str()) {
                broken.push(Violation::new(
                    at("/cache"),
                    format!("cache {} is mounted twice", quoted(cache)),
                ));
            }
        }
    }
}

/// Parses a worker configuration.
pub fn parse_config(value: &Value) -> Result<WorkerConfig, Violations> {
    parse_document(DocumentKind::Config, value)
}

/// Turns one validator error into violations with a pointer and a readable rule.
fn describe(error: &ValidationError<'_>, out: &mut Vec<Violation>) {
    let pointer = error.instance_path().as_str();
    match error.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_owned);
            out.push(Violation::new(
                format!("{pointer}/{}", escape_token(&name)),
                "required",
            ));
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            out.extend(unexpected.iter().map(|name| {
                Violation::new(format!("{pointer}/{}", escape_token(name)), "unknown field")
            }));
        }
        ValidationErrorKind::PropertyNames { error: inner } => {
            let name = inner.instance().as_str().unwrap_or_default().to_owned();
            out.push(Violation::new(
                format!("{pointer}/{}", escape_token(&name)),
                format!("invalid name: {inner}"),
            ));
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            if let Some(allowed) = constants_of(pointer, context) {
                out.push(Violation::new(
                    pointer,
                    format!("{} is not one of {}", error.instance(), allowed.join(", ")),
                ));
            } else if let Some(branch) = branch_of_matching_type(pointer, context) {
                branch.iter().for_each(|inner| describe(inner, out));
            } else {
                out.push(Violation::new(pointer, "does not match any allowed form"));
            }
        }
        ValidationErrorKind::Enum { options } => {
            out.push(Violation::new(
                pointer,
                format!("{} is not one of {options}", error.instance()),
            ));
        }
        _ => out.push(Violation::new(pointer, error.to_string())),
    }
}

/// When every alternative is a constant (a closed set of strings), the allowed values.
fn constants_of(pointer: &str, context: &[Vec<ValidationError<'static>>]) -> Option<Vec<String>> {
    context
        .iter()
        .map(|branch| match branch.as_slice() {
            [only] if only.instance_path().as_str() == pointer => match only.kind() {
                ValidationErrorKind::Constant { expected_value } => {
                    Some(expected_value.to_string())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Of the alternatives of an `anyOf`/`oneOf`, the one whose type matched the value (so its
/// errors say what is wrong inside it), when exactly one did.
fn branch_of_matching_type<'e>(
    pointer: &str,
    context: &'e [Vec<ValidationError<'static>>],
) -> Option<&'e Vec<ValidationError<'static>>> {
    let mut matching = context.iter().filter(|branch| {
        !branch.iter().any(|error| {
            error.instance_path().as_str() == pointer
                && matches!(
                    error.kind(),
                    ValidationErrorKind::Type { .. } | ValidationErrorKind::Constant { .. }
                )
        })
    });
    let first = matching.next()?;
    matching.next().is_none().then_some(first)
}

//! The committed JSON Schemas under `schemas/json/` must be exactly what the types generate.
//! Run `make schemas` (TASKVM_UPDATE_SCHEMAS=1) to rewrite them after changing a type.

use std::path::PathBuf;

use schemas::DocumentKind;

fn committed_path(kind: DocumentKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("json")
        .join(kind.schema_file_name())
}

#[test]
fn committed_schemas_are_up_to_date() {
    let update = std::env::var_os("TASKVM_UPDATE_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for kind in DocumentKind::ALL {
        let path = committed_path(kind);
        let generated = kind.schema_text();
        if update {
            std::fs::write(&path, &generated).expect("write schema file");
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale schema files (run `make schemas`): {}",
        stale.join(", ")
    );
}

#[test]
fn every_schema_is_draft_2020_12_and_compiles() {
    for kind in DocumentKind::ALL {
        let schema = kind.json_schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema",
            "{}",
            kind.name()
        );
        jsonschema::draft202012::meta::validate(&schema).unwrap_or_else(|error| {
            panic!("{} schema is not a valid schema: {error}", kind.name())
        });
        // A structural check must run without an internal error.
        let outcome = schemas::check_structure(kind, &serde_json::json!({}));
        if let Err(violations) = outcome {
            assert!(
                !violations.to_string().contains("internal error"),
                "{violations}"
            );
        }
    }
}

//! Payload parsing: every kind of error is reported with its JSON pointer, and good payloads
//! come out typed.

use schemas::{
    limit_violation, parse_json, parse_payload, resolve_machine, ArtifactKind, ImageRef,
    MachineLayers, MachineLimits,
};
use serde_json::{json, Value};

fn errors(payload: Value) -> Vec<String> {
    parse_payload(&payload)
        .expect_err("payload should be refused")
        .as_slice()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn minimal() -> Value {
    json!({"image": "https://images.example/minimal.tar.zst", "command": ["true"], "maxRunTime": 60})
}

fn with(field: &str, value: Value) -> Value {
    let mut payload = minimal();
    payload[field] = value;
    payload
}

#[test]
fn a_minimal_payload_gets_its_defaults() {
    let payload = parse_payload(&minimal()).unwrap();
    assert!(payload.screenshot, "screenshots default to on");
    assert!(payload.env.is_empty() && payload.artifacts.is_empty() && payload.machine.is_none());
    assert_eq!(payload.image.sha256(), None);
}

#[test]
fn a_full_payload_parses() {
    let sha = "a".repeat(64);
    let payload = parse_payload(&json!({
        "image": {"url": "file:///srv/images/minimal.tar.zst", "sha256": sha},
        "command": ["sh", "-c", "echo $GREETING"],
        "env": {"GREETING": "hello", "_X1": ""},
        "maxRunTime": 86400,
        "machine": {"memory": 512, "cores": 2, "chipset": "microvm"},
        "artifacts": [
            {"type": "file", "path": "/tmp/out.txt", "name": "public/out.txt"},
            {"type": "directory", "path": "/tmp/results", "name": "public/results"}
        ],
        "screenshot": false
    }))
    .unwrap_or_else(|v| panic!("{v}"));
    assert!(matches!(payload.image, ImageRef::Pinned(_)));
    assert_eq!(payload.image.url(), "file:///srv/images/minimal.tar.zst");
    assert_eq!(payload.artifacts[1].kind, ArtifactKind::Directory);
    assert!(!payload.screenshot);
}

#[test]
fn missing_fields_are_required_by_pointer() {
    assert_eq!(
        errors(json!({})),
        [
            "/command: required",
            "/image: required",
            "/maxRunTime: required"
        ]
    );
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let mut payload = with("maxRuntime", json!(5));
    payload["machine"] = json!({"memroy": 512});
    payload["artifacts"] = json!([{"type": "file", "path": "/a", "name": "a", "mode": 1}]);
    assert_eq!(
        errors(payload),
        [
            "/artifacts/0/mode: unknown field",
            "/machine/memroy: unknown field",
            "/maxRuntime: unknown field"
        ]
    );
}

#[test]
fn wrong_types_name_the_expected_type() {
    let mut payload = with("command", json!("echo hi"));
    payload["maxRunTime"] = json!("60");
    payload["env"] = json!({"A": 1});
    let found = errors(payload);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with("/command: \"echo hi\" is not of type \"array\""));
    assert!(found[1].starts_with("/env/A: 1 is not of type \"string\""));
    assert!(found[2].starts_with("/maxRunTime: \"60\" is not of type"));
}

#[test]
fn bounds_are_enforced() {
    for (value, expected) in [
        (json!(0), "/maxRunTime: 0 is less than the minimum of 1"),
        (
            json!(86401),
            "/maxRunTime: 86401 is greater than the maximum of 86400",
        ),
        (json!(1.5), "/maxRunTime: 1.5 is not of type \"integer\""),
    ] {
        assert_eq!(errors(with("maxRunTime", value)), [expected]);
    }
    assert_eq!(
        errors(with("command", json!([]))),
        ["/command: [] has less than 1 item"]
    );
}

#[test]
fn image_references_must_be_http_https_or_file() {
    for url in [
        "ftp://host/x.tar.zst",
        "/local/path",
        "https://",
        "file://relative",
    ] {
        let found = errors(with("image", json!(url)));
        assert_eq!(found.len(), 1, "{url}: {found:?}");
        assert!(found[0].starts_with("/image: "), "{url}: {found:?}");
    }
    let found = errors(with(
        "image",
        json!({"url": "https://x/y", "sha256": "ABC"}),
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("/image/sha256: "));
    assert_eq!(
        errors(with("image", json!(5))),
        ["/image: does not match any allowed form"]
    );
}

#[test]
fn artifact_names_cannot_escape_the_artifacts_directory() {
    for name in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        ".",
        "a/./b",
        "",
        "a\\b",
    ] {
        let artifact = json!([{"type": "file", "path": "/x", "name": name}]);
        let found = errors(with("artifacts", artifact));
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert!(
            found[0].starts_with("/artifacts/0/name: "),
            "{name}: {found:?}"
        );
    }
}

#[test]
fn artifact_names_are_unique() {
    let artifacts = json!([
        {"type": "file", "path": "/a", "name": "out"},
        {"type": "file", "path": "/b", "name": "out"}
    ]);
    assert_eq!(
        errors(with("artifacts", artifacts)),
        ["/artifacts/1/name: duplicate artifact name \"out\""]
    );
}

#[test]
fn artifact_names_taskvm_keeps_are_refused_with_a_pointer() {
    for name in [
        "live.log",
        "serial.log",
        "qemu.log",
        "screenshot.png",
        "live.log/inside",
        "public/logs/live.log",
        "public/logs/live_backing.log",
        "public/screenshot.png",
    ] {
        let artifacts = json!([
            {"type": "file", "path": "/fine", "name": "fine.log"},
            {"type": "directory", "path": "/x", "name": name}
        ]);
        let found = errors(with("artifacts", artifacts));
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert!(
            found[0].starts_with(&format!(
                "/artifacts/1/name: artifact name \"{name}\" is taskvm's own"
            )),
            "{found:?}"
        );
    }
    // Near misses and directories above a kept name stay allowed.
    for name in ["live.log.1", "public", "public/logs", "logs/live.log"] {
        let artifacts = json!([{"type": "directory", "path": "/x", "name": name}]);
        assert!(
            parse_payload(&with("artifacts", artifacts)).is_ok(),
            "{name}"
        );
    }
}

#[test]
fn env_names_must_be_valid_variable_names() {
    let found = errors(with("env", json!({"GOOD": "1", "BAD-NAME": "2", "": "3"})));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("/env/: invalid name"));
    assert!(found[1].starts_with("/env/BAD-NAME: invalid name"));
}

#[test]
fn machine_enums_list_the_allowed_values() {
    let found = errors(with("machine", json!({"chipset": "pc-q99"})));
    assert_eq!(
        found,
        [r#"/machine/chipset: "pc-q99" is not one of "pc-i440fx-2.8", "pc", "q35", "microvm""#]
    );
}

#[test]
fn every_error_of_a_bad_payload_is_reported_at_once() {
    let found = errors(json!({
        "image": {"url": "ftp://x", "sha256": "abc"},
        "command": [],
        "maxRunTime": 0,
        "screenshot": "yes",
        "extra": true
    }));
    assert_eq!(found.len(), 6, "{found:?}");
}

#[test]
fn a_machine_over_the_limits_names_pointer_and_both_numbers() {
    let payload = parse_payload(&with("machine", json!({"memory": 65536}))).unwrap();
    let limits = MachineLimits {
        max_memory: 8192,
        max_cpus: 4,
        default_threads: 1,
    };
    let layers = MachineLayers {
        payload: payload.machine.as_ref(),
        ..MachineLayers::default()
    };
    let error = resolve_machine(layers, &limits).unwrap_err();
    assert_eq!(
        limit_violation(&error, "/machine").to_string(),
        "/machine/memory: 65536 exceeds maxMemory 8192"
    );
}

#[test]
fn invalid_json_reports_line_and_column() {
    let error = parse_json("{\n  \"image\": ,\n}").unwrap_err().to_string();
    assert!(
        error.starts_with("<document>: not valid JSON: expected value at line 2 column"),
        "{error}"
    );
}

#[test]
fn pointers_escape_slashes_and_tildes_in_names() {
    let found = errors(with("a/b~c", json!(1)));
    assert_eq!(found, ["/a~1b~0c: unknown field"]);
}

#[test]
fn mounts_parse_and_refuse_unknown_fields_bad_names_and_too_many() {
    let mut payload = with("mounts", json!([{"cache": "deps", "path": "/deps/"}]));
    payload["onExitStatus"] = json!({"purgeCaches": [3, 255]});
    let parsed = parse_payload(&payload).unwrap();
    assert_eq!(parsed.mounts[0].cache.as_deref(), Some("deps"));
    assert_eq!(parsed.on_exit_status.unwrap().purge_caches, [3, 255]);

    let mut payload = with(
        "mounts",
        json!([{"cache": "deps", "path": "/deps", "size": 1}, {"cache": "../x", "path": "/x"}]),
    );
    payload["onExitStatus"] = json!({"purgeCaches": [256], "retry": true});
    let found = errors(payload);
    assert_eq!(found.len(), 4, "{found:?}");
    assert_eq!(found[0], "/mounts/0/size: unknown field");
    assert!(
        found[1].starts_with("/mounts/1/cache: \"../x\" does not match"),
        "{found:?}"
    );
    assert!(
        found[2].starts_with("/onExitStatus/purgeCaches/0: 256"),
        "{found:?}"
    );
    assert_eq!(found[3], "/onExitStatus/retry: unknown field");

    let five: Vec<Value> = (0..5)
        .map(|n| json!({"cache": format!("c{n}"), "path": format!("/c{n}")}))
        .collect();
    let found = errors(with("mounts", json!(five)));
    assert!(found[0].starts_with("/mounts: "), "{found:?}");
}

#[test]
fn mount_paths_are_clean_apart_and_outside_the_kernels_and_caches_named_once() {
    let found = errors(with(
        "mounts",
        json!([
            {"cache": "a", "path": "/"},
            {"cache": "b", "path": "/x/../etc"},
            {"cache": "c", "path": "/proc/x"},
        ]),
    ));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].starts_with("/mounts/0/path: mount path \"/\" must be absolute"),
        "{found:?}"
    );
    assert!(found[1].starts_with("/mounts/1/path: "), "{found:?}");
    assert!(
        found[2].starts_with("/mounts/2/path: ") && found[2].contains("/proc"),
        "{found:?}"
    );
    let found = errors(with(
        "mounts",
        json!([{"cache": "d", "path": "/work"}, {"cache": "e", "path": "/work/sub"}]),
    ));
    assert_eq!(
        found,
        ["/mounts/1/path: mount path \"/work/sub\" overlaps the mount at \"/work\""]
    );
    let found = errors(with(
        "mounts",
        json!([{"cache": "a", "path": "/one"}, {"cache": "a", "path": "/two"}]),
    ));
    assert_eq!(found, ["/mounts/1/cache: cache \"a\" is mounted twice"]);
}

#[test]
fn a_mount_is_a_cache_or_content_with_its_format() {
    let content = json!({"url": "https://example.com/src.tar.zst", "sha256": "a".repeat(64)});
    let good = with(
        "mounts",
        json!([{"content": content, "format": "tar.zst", "path": "/src"}]),
    );
    let parsed = parse_payload(&good).unwrap();
    assert_eq!(
        parsed.mounts[0].format,
        Some(schemas::payload::ContentFormat::TarZst)
    );
    let found = errors(with(
        "mounts",
        json!([{"content": content, "format": "rar", "path": "/five"}]),
    ));
    assert_eq!(
        found,
        ["/mounts/0/format: \"rar\" is not one of \"tar.zst\", \"tar.gz\", \"zip\""]
    );
    let found = errors(with(
        "mounts",
        json!([
            {"cache": "a", "content": content, "format": "tar.gz", "path": "/one"},
            {"path": "/two"},
            {"cache": "b", "format": "tar.gz", "path": "/three"},
            {"content": content, "path": "/four"},
        ]),
    ));
    assert_eq!(
        found,
        [
            "/mounts/0: a mount is a cache or content, not both",
            "/mounts/1: a mount needs \"cache\" (a writable cache) or \"content\" (read-only)",
            "/mounts/2/format: \"format\" belongs to content, not to a cache",
            "/mounts/3/format: content needs its \"format\" (tar.zst, tar.gz or zip)",
        ]
    );
}

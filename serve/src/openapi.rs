//! The OpenAPI 3.1 document of the API: the routes written here, every body's schema derived
//! from its type — the task payload's JSON Schema (the one `taskvm schema payload` prints) as
//! the request body, the answers' from [`crate::wire`].

use schemas::DocumentKind;
use serde_json::{json, Map, Value};

/// The whole document.
pub fn document() -> Value {
    let mut components = Map::new();
    let payload =
        serde_json::from_str(&DocumentKind::Payload.schema_text()).unwrap_or_else(|_| json!({}));
    let payload = into_components(payload, &mut components);
    components.insert("Payload".into(), payload);
    for (name, schema) in crate::wire::schemas() {
        let schema = into_components(schema, &mut components);
        components.insert(name.into(), schema);
    }
    let task_id = json!({
        "name": "taskId", "in": "path", "required": true,
        "description": "The task's id (16 hexadecimal digits).",
        "schema": { "type": "string" }
    });
    let kept_name = json!({
        "name": "name", "in": "path", "required": true,
        "description": "The kept VM's name (from /api/kept).",
        "schema": { "type": "string" }
    });
    let run = json!({
        "name": "run", "in": "query", "required": false,
        "description": "Which run (0 for the first); the newest by default.",
        "schema": { "type": "integer", "minimum": 0 }
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "taskvm serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The embedded queue of taskvm: submit task payloads, follow their \
                logs, fetch artifacts and screenshots, cancel them. Off loopback every request \
                needs the server's token (Authorization: Bearer TOKEN)."
        },
        "paths": {
            "/api/tasks": {
                "post": {
                    "operationId": "submitTask",
                    "summary": "Queue a task",
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Payload" } } }
                    },
                    "responses": responses(&[
                        ("201", "Queued", Some("#/components/schemas/Created")),
                        ("400", "Not JSON, or a malformed payload (every violation with its JSON pointer)", Some(ERROR)),
                        ("413", "The body is larger than 1 MiB", None),
                        ("415", "The body is not application/json", Some(ERROR)),
                    ])
                },
                "get": {
                    "operationId": "listTasks",
                    "summary": "Tasks, newest first",
                    "parameters": [
                        { "name": "state", "in": "query", "required": false,
                          "schema": { "type": "string", "enum": ["queued", "running", "completed", "failed", "exception"] } },
                        { "name": "limit", "in": "query", "required": false,
                          "schema": { "type": "integer", "minimum": 1, "maximum": 1000 } }
                    ],
                    "responses": responses(&[
                        ("200", "The tasks", Some("#/components/schemas/TaskList")),
                        ("400", "A bad filter", Some(ERROR)),
                    ])
                }
            },
            "/api/tasks/{taskId}": {
                "get": {
                    "operationId": "getTask",
                    "summary": "A task, its payload and its runs",
                    "parameters": [task_id],
                    "responses": responses(&[
                        ("200", "The task", Some("#/components/schemas/Task")),
                        ("404", "No such task", Some(ERROR)),
                    ])
                }
            },
            "/api/tasks/{taskId}/cancel": {
                "post": {
                    "operationId": "cancelTask",
                    "summary": "Cancel a queued or running task",
                    "parameters": [task_id],
                    "responses": responses(&[
                        ("200", "A queued task was resolved exception/canceled", Some("#/components/schemas/Canceled")),
                        ("202", "The running task's VM is being stopped", Some("#/components/schemas/Canceled")),
                        ("404", "No such task", Some(ERROR)),
                        ("409", "The task is resolved already", Some(ERROR)),
                    ])
                }
            },
            "/api/tasks/{taskId}/log": {
                "get": {
                    "operationId": "getTaskLog",
                    "summary": "The task log, streamed until the run ends",
                    "parameters": [task_id, run],
                    "responses": {
                        "200": { "description": "The log text", "content": { "text/plain": { "schema": { "type": "string" } } } },
                        "400": error_response("A bad run number"),
                        "404": error_response("No such task or run")
                    }
                }
            },
            "/api/tasks/{taskId}/artifacts/{name}": {
                "get": {
                    "operationId": "getArtifact",
                    "summary": "One file of a resolved run",
                    "parameters": [task_id,
                        { "name": "name", "in": "path", "required": true,
                          "description": "The artifact's name as the task lists it (live.log, serial.log, screenshot.png, the payload's names).",
                          "schema": { "type": "string" } },
                        run],
                    "responses": {
                        "200": { "description": "The file, with a content type by its extension", "content": artifact_content() },
                        "400": error_response("A bad run number"),
                        "404": error_response("No such task, run or artifact"),
                        "409": error_response("The run has not ended"),
                        "410": error_response("The file was removed")
                    }
                }
            },
            "/api/tasks/{taskId}/screenshot": {
                "get": {
                    "operationId": "getScreenshot",
                    "summary": "A fresh screenshot of the running VM, or the run's last one",
                    "parameters": [task_id],
                    "responses": {
                        "200": { "description": "PNG", "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } },
                        "404": error_response("No such task, or no screenshot"),
                        "409": error_response("The machine has no display"),
                        "410": error_response("The file was removed"),
                        "503": error_response("The VM's screen could not be read")
                    }
                }
            },
            "/api/tasks/{taskId}/console": {
                "get": {
                    "operationId": "openConsole",
                    "summary": "A websocket (subprotocol binary) carrying the VM's VNC stream, for noVNC",
                    "parameters": [task_id],
                    "responses": {
                        "101": { "description": "Switching to the websocket" },
                        "400": error_response("Not a websocket request"),
                        "404": error_response("No such task"),
                        "409": error_response("No running VM with a display"),
                        "503": error_response("The VM's VNC server cannot be reached")
                    }
                }
            },
            "/api/tasks/{taskId}/shell": {
                "get": {
                    "operationId": "openShell",
                    "summary": "A websocket to a new login shell in the running VM: binary messages are keys (client to server) and the terminal's output (server to client); a text message {\"rows\": R, \"cols\": C} resizes the terminal",
                    "parameters": [
                        task_id,
                        { "name": "rows", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 65535, "default": 24 } },
                        { "name": "cols", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 65535, "default": 80 } }
                    ],
                    "responses": {
                        "101": { "description": "Switching to the websocket" },
                        "400": error_response("Not a websocket request"),
                        "404": error_response("No such task"),
                        "409": error_response("No running VM"),
                        "503": error_response("The guest's agent opened no shell (too many open, or an agent without shells)")
                    }
                }
            },
            "/api/kept": {
                "get": {
                    "operationId": "listKept",
                    "summary": "The failed VMs this host keeps for debugging (payload debug.keepOnFailure), oldest first; the kept limits are applied first",
                    "responses": responses(&[("200", "The kept VMs", Some("#/components/schemas/KeptList"))])
                }
            },
            "/api/kept/{name}": {
                "delete": {
                    "operationId": "deleteKept",
                    "summary": "Deletes the kept VM with everything it held (copies resumed from it go on until they end)",
                    "parameters": [kept_name],
                    "responses": responses(&[
                        ("200", "Deleted", Some("#/components/schemas/KeptDeleted")),
                        ("404", "No such kept VM", Some("#/components/schemas/Error"))
                    ])
                }
            },
            "/api/kept/{name}/shell": {
                "get": {
                    "operationId": "openKeptShell",
                    "summary": "A websocket to a shell in a fresh copy of the kept VM, as it was when its command failed (the copy holds host capacity and is discarded when the shell ends or after kept.resumeTime); spoken as /api/tasks/{taskId}/shell",
                    "parameters": [kept_name],
                    "responses": {
                        "101": { "description": "Switching to the websocket" },
                        "400": error_response("Not a websocket request"),
                        "404": error_response("No such kept VM"),
                        "503": error_response("It cannot be resumed (its image left the cache, the host changed), or its agent opened no shell")
                    }
                }
            },
            "/api/kept/{name}/exec": {
                "post": {
                    "operationId": "execInKept",
                    "summary": "Runs sh -c SCRIPT in a fresh copy of the kept VM and answers its exit code and output (at most 1 MiB); the copy is discarded",
                    "parameters": [kept_name],
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ExecRequest" } } }
                    },
                    "responses": {
                        "200": { "description": "How the script ended", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ExecAnswer" } } } },
                        "400": error_response("Not a script"),
                        "404": error_response("No such kept VM"),
                        "503": error_response("It cannot be resumed, or its agent did not answer"),
                        "504": error_response("kept.resumeTime passed first")
                    }
                }
            },
            "/api/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether the server works, its queue and capacity",
                    "responses": responses(&[("200", "Healthy", Some("#/components/schemas/Health"))])
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": responses(&[("200", "OpenAPI 3.1", None)])
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus text exposition",
                    "responses": {
                        "200": { "description": "Metrics", "content": { "text/plain": { "schema": { "type": "string" } } } }
                    }
                }
            }
        },
        "components": {
            "schemas": components,
            "securitySchemes": { "token": { "type": "http", "scheme": "bearer" } }
        }
    })
}

const ERROR: &str = "#/components/schemas/Error";

/// Every content type an artifact can be served with, each a binary body.
fn artifact_content() -> Value {
    let types = lifecycle::artifacts::CONTENT_TYPES
        .iter()
        .map(|(_, content_type)| *content_type)
        .chain([lifecycle::artifacts::DEFAULT_CONTENT_TYPE]);
    let content: Map<String, Value> = types
        .map(|content_type| {
            let media_type = content_type
                .split(';')
                .next()
                .unwrap_or(content_type)
                .trim();
            let schema = json!({ "schema": { "type": "string", "format": "binary" } });
            (media_type.to_string(), schema)
        })
        .collect();
    Value::Object(content)
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": ERROR } } }
    })
}

fn responses(entries: &[(&str, &str, Option<&str>)]) -> Value {
    let mut map = Map::new();
    for (status, description, schema) in entries {
        let mut response = json!({ "description": description });
        if let Some(schema) = schema {
            response["content"] = json!({ "application/json": { "schema": { "$ref": schema } } });
        } else if *status == "200" {
            response["content"] = json!({ "application/json": { "schema": { "type": "object" } } });
        } else {
            response["content"] = json!({ "application/json": { "schema": { "$ref": ERROR } } });
        }
        map.insert((*status).to_owned(), response);
    }
    Value::Object(map)
}

/// `schema` with its `$defs` moved into `components` (references rewritten); definitions of
/// one name are one type's, whichever schema brought them.
fn into_components(mut schema: Value, components: &mut Map<String, Value>) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.remove("$schema");
        if let Some(Value::Object(definitions)) = object.remove("$defs") {
            for (name, mut definition) in definitions {
                rewrite_refs(&mut definition);
                components.insert(name, definition);
            }
        }
    }
    rewrite_refs(&mut schema);
    schema
}

fn rewrite_refs(value: &mut Value) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object.iter_mut() {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(target)) => {
                        if let Some(name) = target.strip_prefix("#/$defs/") {
                            *target = format!("#/components/schemas/{name}");
                        }
                    }
                    (_, inner) => rewrite_refs(inner),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves_inside_the_document() {
        let document = document();
        let text = document.to_string();
        assert!(!text.contains("#/$defs/"));
        let mut refs = Vec::new();
        collect_refs(&document, &mut refs);
        assert!(refs.len() > 10);
        for target in refs {
            let pointer = target.trim_start_matches('#');
            assert!(document.pointer(pointer).is_some(), "{target} dangles");
        }
    }

    fn collect_refs(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                for (key, inner) in object {
                    if key == "$ref" {
                        refs.push(inner.as_str().unwrap().to_owned());
                    } else {
                        collect_refs(inner, refs);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect_refs(item, refs)),
            _ => {}
        }
    }
}

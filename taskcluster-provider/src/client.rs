//! A client of one Taskcluster service (`queue`, `worker-manager`, …): JSON calls signed with
//! Hawk, retried with back-off on connection errors and 5xx answers (a 4xx comes back at once),
//! each answer read up to [`ANSWER_LIMIT`].

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use schemas::shown::escaped;
use serde_json::{json, Value};

/// The largest answer read from a service (a `claimWork` with its task definitions is far
/// smaller).
pub const ANSWER_LIMIT: usize = 32 << 20;

/// How often a call is tried again after a connection error or a 5xx answer.
const RETRIES: u32 = 5;
/// The first wait before trying again; it doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Taskcluster credentials; temporary ones carry their certificate (JSON text).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The client id.
    pub client_id: String,
    /// The access token (never shown by `Debug`).
    pub access_token: String,
    /// The certificate of temporary credentials.
    pub certificate: Option<String>,
}

impl Credentials {
    /// Permanent credentials.
    pub fn new(client_id: impl Into<String>, access_token: impl Into<String>) -> Credentials {
        Credentials {
            client_id: client_id.into(),
            access_token: access_token.into(),
            certificate: None,
        }
    }

    /// Temporary credentials with their certificate.
    pub fn new_with_certificate(
        client_id: impl Into<String>,
        access_token: impl Into<String>,
        certificate: impl Into<String>,
    ) -> Credentials {
        Credentials {
            certificate: Some(certificate.into()),
            ..Credentials::new(client_id, access_token)
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("access_token", &"…")
            .field("certificate", &self.certificate.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A call that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The HTTP status, when the service answered.
    pub status: Option<u16>,
    /// What went wrong (the service's own words cut to 200 characters and escaped).
    pub message: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl CallError {
    fn local(message: impl Into<String>) -> CallError {
        CallError {
            status: None,
            message: message.into(),
        }
    }
}

/// What signs the requests: the Hawk key, and the `ext` that carries a certificate.
struct Signer {
    credentials: hawk::Credentials,
    ext: Option<String>,
}

/// One service of a deployment, called with one set of credentials (or none).
pub struct Service {
    http: reqwest::Client,
    base: Url,
    signer: Option<Signer>,
}

impl Service {
    /// The service `name` (e.g. `queue`) of the deployment at `root_url`, each attempt of a
    /// call bounded by `timeout`.
    pub fn new(
        root_url: &str,
        name: &str,
        credentials: Option<&Credentials>,
        timeout: Duration,
    ) -> Result<Service, CallError> {
        let root = root_url.trim_end_matches('/');
        let base = Url::parse(&format!("{root}/api/{name}/v1/"))
            .map_err(|error| CallError::local(format!("the root URL {root:?}: {error}")))?;
        let signer = credentials.map(signer).transpose()?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|error| CallError::local(error.to_string()))?;
        Ok(Service { http, base, signer })
    }

    /// The URL of the path made of `segments` (each percent-encoded, so an artifact name
    /// keeps its slashes inside one segment).
    pub fn url(&self, segments: &[&str]) -> Result<Url, CallError> {
        let path: Vec<String> = segments.iter().map(|segment| encode(segment)).collect();
        self.base
            .join(&path.join("/"))
            .map_err(|error| CallError::local(error.to_string()))
    }

    /// `method` on the path made of `segments` (each percent-encoded, so an artifact name
    /// keeps its slashes inside one segment), with `body` as JSON; the answer's JSON.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let url = self.url(segments)?;
        let body = body.map(Value::to_string);
        let mut delay = FIRST_DELAY;
        let mut attempt = 0;
        loop {
            let result = self.attempt(&method, &url, body.as_deref()).await;
            let retryable = match &result {
                Ok(_) => false,
                Err(error) => error.status.is_none_or(|status| status >= 500),
            };
            if !retryable || attempt == RETRIES {
                return result;
            }
            attempt += 1;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_DELAY);
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&str>,
    ) -> Result<Value, CallError> {
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_owned());
        }
        if let Some(signer) = &self.signer {
            let header = authorization(signer, method, url, body)?;
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let mut response = request
            .send()
            .await
            .map_err(|error| CallError::local(format!("{method} {url}: {}", transport(error))))?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| CallError::local(format!("{method} {url}: {}", transport(error))))?
        {
            if bytes.len() + chunk.len() > ANSWER_LIMIT {
                return Err(CallError {
                    status: Some(status.as_u16()),
                    message: format!("{method} {url}: the answer is over {ANSWER_LIMIT} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return answer.ok_or_else(|| CallError {
                status: Some(status.as_u16()),
                message: format!("{method} {url}: the answer is not JSON"),
            });
        }
        Err(CallError {
            status: Some(status.as_u16()),
            message: refusal(status, answer.as_ref()),
        })
    }
}

fn signer(credentials: &Credentials) -> Result<Signer, CallError> {
    let key = hawk::Key::new(credentials.access_token.as_bytes(), hawk::SHA256)
        .map_err(|error| CallError::local(format!("the access token: {error}")))?;
    let ext = match &credentials.certificate {
        Some(certificate) => {
            let certificate: Value = serde_json::from_str(certificate).map_err(|error| {
                CallError::local(format!("the certificate is not JSON: {error}"))
            })?;
            let ext = json!({ "certificate": certificate }).to_string();
            use base64::Engine as _;
            Some(base64::engine::general_purpose::STANDARD.encode(ext))
        }
        None => None,
    };
    Ok(Signer {
        credentials: hawk::Credentials {
            id: credentials.client_id.clone(),
            key,
        },
        ext,
    })
}

/// A transport error without the URL it would repeat, with the causes it wraps (such as
/// "Connection refused").
fn transport(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `Authorization: Hawk …` value of one request (signed afresh for each attempt: Hawk
/// headers carry their time).
fn authorization(
    signer: &Signer,
    method: &Method,
    url: &Url,
    body: Option<&str>,
) -> Result<String, CallError> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(443);
    let path = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let hash = body
        .map(|body| hawk::PayloadHasher::hash("application/json", hawk::SHA256, body))
        .transpose()
        .map_err(|error| CallError::local(format!("hashing the body: {error}")))?;
    let request = hawk::RequestBuilder::new(method.as_str(), host, port, &path)
        .hash(hash.as_deref())
        .ext(signer.ext.as_deref())
        .request();
    let header = request
        .make_header(&signer.credentials)
        .map_err(|error| CallError::local(format!("signing: {error}")))?;
    Ok(format!("Hawk {header}"))
}

/// The service's reason for a refusal: its `code` and the first line of its `message`, cut
/// and escaped.
fn refusal(status: StatusCode, answer: Option<&Value>) -> String {
    let text = |name: &str| answer.and_then(|answer| answer.get(name)?.as_str());
    let reason = match (text("code"), text("message")) {
        (Some(code), Some(message)) => {
            format!("{code}: {}", message.lines().next().unwrap_or_default())
        }
        (Some(code), None) => code.to_owned(),
        (None, Some(message)) => message.lines().next().unwrap_or_default().to_owned(),
        (None, None) => status.canonical_reason().unwrap_or("refused").to_owned(),
    };
    escaped(&reason)
}

/// A path segment with everything but unreserved characters percent-encoded.
fn encode(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_slashes_inside_and_tokens_stay_out_of_debug() {
        assert_eq!(encode("public/logs/live.log"), "public%2Flogs%2Flive.log");
        assert_eq!(encode("a b~c"), "a%20b~c");
        let credentials = Credentials::new_with_certificate("me", "secret-token", "{}");
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("secret-token") && shown.contains("me"),
            "{shown}"
        );
    }

    #[test]
    fn a_certificate_travels_in_ext_as_base64_json() {
        let credentials = Credentials::new_with_certificate("me", "t", r#"{"version":1}"#);
        let ext = signer(&credentials).unwrap().ext.unwrap();
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(ext)
            .unwrap();
        let ext: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(ext, json!({ "certificate": { "version": 1 } }));
        let bad = Credentials::new_with_certificate("me", "t", "not json");
        assert!(signer(&bad).is_err());
    }

    #[test]
    fn refusals_say_the_services_code_and_first_line_escaped() {
        let answer = json!({ "code": "InsufficientScopes", "message": "you need\nmore" });
        let text = refusal(StatusCode::FORBIDDEN, Some(&answer));
        assert_eq!(text, "InsufficientScopes: you need");
        let hostile = json!({ "message": format!("\u{1b}[31m{}", "x".repeat(400)) });
        let text = refusal(StatusCode::BAD_REQUEST, Some(&hostile));
        assert!(
            text.starts_with("\\u{1b}[31m") && text.ends_with('…'),
            "{text}"
        );
    }

    #[test]
    fn a_connection_error_names_the_url_once_and_its_cause() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = format!("http://127.0.0.1:{port}");
        let queue = Service::new(&root, "queue", None, Duration::from_secs(5)).unwrap();
        let url = queue.base.join("ping").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let error = runtime
            .block_on(queue.attempt(&Method::GET, &url, None))
            .unwrap_err();
        assert_eq!(error.status, None);
        assert_eq!(error.message.matches(&root).count(), 1, "{}", error.message);
        assert!(
            error.message.to_lowercase().contains("refused"),
            "{}",
            error.message
        );
    }
}

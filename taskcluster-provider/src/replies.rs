//! What the worker's HTTP server answers with: plain text or streamed bodies, their
//! headers, and the random tokens its paths carry.

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// Random bytes in a log's or a shell's path: 256 bits, 43 characters of URL-safe base64.
const TOKEN_BYTES: usize = 32;

/// A new path token.
pub(crate) fn new_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; TOKEN_BYTES]>())
}

/// A response body: a whole text, or a log streamed.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: &str) -> Response<Body> {
    let body = Full::new(Bytes::copy_from_slice(body.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    headers(&mut response);
    response
}

/// The headers of every answer: plain text, never cached or sniffed, readable from any
/// page (the URL is the secret).
pub(crate) fn headers(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // The Taskcluster UI reads live logs from the browser; the URL is the secret.
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

//! Who may use the server. On loopback anyone on the host may, but only through a loopback
//! `Host` (no DNS rebinding) and never from another site's page (a foreign `Origin` is
//! refused). Bound anywhere else, every request must carry the server's token: a
//! `Authorization: Bearer` header, the `taskvm_token` cookie the UI sets, or `?token=` (for
//! the first page load and websockets).

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The name of the cookie that carries the token.
pub const COOKIE: &str = "taskvm_token";

/// The access rule of one server.
#[derive(Debug, Clone)]
pub struct Access {
    /// The token every request must carry; None on loopback.
    token: Option<String>,
    /// The address served, for the `Host` check.
    listen: SocketAddr,
}

impl Access {
    /// The rule for a server on `listen`: a fresh random token unless it is loopback, or
    /// always when `require_token` is set.
    pub fn for_address(listen: SocketAddr, require_token: bool) -> Access {
        let token = (require_token || !listen.ip().is_loopback()).then(|| {
            let bytes: [u8; 24] = rand::random();
            hex::encode(bytes)
        });
        Access { token, listen }
    }

    /// The token, when one is required.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(), (StatusCode, &'static str)> {
        if self.token.is_none() && !self.loopback_host(headers) {
            return Err((
                StatusCode::FORBIDDEN,
                "the Host header must name the loopback address this server listens on",
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let host = headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok());
            let same = host.is_some_and(|host| {
                origin.to_str().ok() == Some(format!("http://{host}").as_str())
            });
            if !same {
                return Err((
                    StatusCode::FORBIDDEN,
                    "requests from other origins are refused",
                ));
            }
        }
        match &self.token {
            None => Ok(()),
            Some(token)
                if presented(headers, query).is_some_and(|given| constant_eq(&given, token)) =>
            {
                Ok(())
            }
            Some(_) => Err((
                StatusCode::UNAUTHORIZED,
                "this server needs its access token (Authorization: Bearer TOKEN, or ?token=TOKEN)",
            )),
        }
    }

    fn loopback_host(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
        else {
            return false;
        };
        let port = self.listen.port();
        let allowed = [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
            self.listen.to_string(),
        ];
        allowed.iter().any(|name| name.eq_ignore_ascii_case(host))
    }
}

/// The token a request carries, wherever it carries it.
fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .find_map(|pair| {
                pair.trim()
                    .strip_prefix(&format!("{COOKIE}="))
                    .map(str::to_owned)
            })
    };
    let in_query = || {
        query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
    };
    bearer.or_else(cookie).or_else(in_query)
}

/// Compares without stopping at the first difference.
fn constant_eq(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |differs, (a, b)| differs | (a ^ b))
            == 0
}

/// The middleware that applies the rule to every request. A request that authenticated
/// with `?token=` gets the cookie, so that the UI's later requests carry it.
pub async fn enforce(State(access): State<Access>, request: Request, next: Next) -> Response {
    let query = request.uri().query().map(str::to_owned);
    if let Err((status, message)) = access.check(request.headers(), query.as_deref()) {
        let body = serde_json::json!({ "error": message }).to_string();
        return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let via_query = access.token.is_some()
        && query
            .as_deref()
            .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("token=")));
    let mut response = next.run(request).await;
    if let (true, Some(token)) = (via_query, &access.token) {
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(value) = cookie.parse() {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn loopback_needs_no_token_but_a_loopback_host_and_no_foreign_origin() {
        let access = Access::for_address("127.0.0.1:8080".parse().unwrap(), false);
        assert!(access.token().is_none());
        let local = headers(&[(header::HOST, "127.0.0.1:8080")]);
        assert!(access.check(&local, None).is_ok());
        assert!(access
            .check(&headers(&[(header::HOST, "localhost:8080")]), None)
            .is_ok());
        let rebound = headers(&[(header::HOST, "evil.example:8080")]);
        assert_eq!(
            access.check(&rebound, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let cross = headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://evil.example"),
        ]);
        assert_eq!(
            access.check(&cross, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let same = headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://127.0.0.1:8080"),
        ]);
        assert!(access.check(&same, None).is_ok());
    }

    #[test]
    fn elsewhere_every_request_needs_the_token_in_a_header_cookie_or_query() {
        let access = Access::for_address("10.0.0.1:8080".parse().unwrap(), false);
        let token = access.token().unwrap().to_owned();
        assert_eq!(token.len(), 48);
        let host = (header::HOST, "10.0.0.1:8080");
        assert_eq!(
            access
                .check(&headers(std::slice::from_ref(&host)), None)
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        let bearer = format!("Bearer {token}");
        assert!(access
            .check(
                &headers(&[host.clone(), (header::AUTHORIZATION, &bearer)]),
                None
            )
            .is_ok());
        let cookie = format!("other=1; {COOKIE}={token}");
        assert!(access
            .check(&headers(&[host.clone(), (header::COOKIE, &cookie)]), None)
            .is_ok());
        assert!(access
            .check(
                &headers(std::slice::from_ref(&host)),
                Some(&format!("a=b&token={token}"))
            )
            .is_ok());
        let wrong = format!("Bearer {}", "0".repeat(48));
        assert!(access
            .check(&headers(&[host, (header::AUTHORIZATION, &wrong)]), None)
            .is_err());
    }
}

//! The HTTP side of the sender: the controller URL and one POST per event.
//!
//! HTTP/1.1 over hyper's connection API, one connection per request: events are rare (a
//! handful a minute per node) and a fresh connection never meets a half-closed keep-alive one.
//! `https://` URLs speak TLS (rustls: the system's roots or `controller.ca_file`, and
//! optionally a client certificate), and a node's bearer token goes in `Authorization`.

use std::net::Ipv6Addr;
use std::time::Duration;
use std::{fmt, io};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::ForwardError;

/// The most of a refusal's body kept in `rejected/`.
const MAX_RESPONSE: usize = 64 << 10;

/// A parsed controller URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (an IPv6 one without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header: host (bracketed if IPv6) and port.
    pub authority: String,
    /// The path events are POSTed to: the URL's path without trailing '/', then `/v1/events`.
    pub events_path: String,
    /// `https://`: the exchange is TLS.
    pub tls: bool,
}

/// Everything one POST needs: where, over what, and as whom.
#[derive(Clone)]
pub struct Link {
    pub endpoint: Endpoint,
    /// Set for an `https://` endpoint.
    pub tls: Option<TlsConnector>,
    /// The node's bearer token, sent as `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// Parses `http[s]://HOST[:PORT][/PREFIX]` (HOST a name, an IPv4 address or a bracketed IPv6
/// one; PORT 80, or 443 for https, when absent).
pub fn parse_url(url: &str) -> Result<Endpoint, ForwardError> {
    let bad = |reason: &str| ForwardError::BadUrl { url: url.into(), reason: reason.into() };
    let scheme_end = url.find("://").ok_or_else(|| bad("no http:// or https:// at the start"))?;
    let tls = match url[..scheme_end].to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let rest = &url[scheme_end + 3..];
    if let Some(c) = rest.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(&format!("it contains {c:?}")));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("a query or fragment has no meaning here; remove it"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(bad("user information is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(|| bad("an IPv6 address lacks its ']'"))?;
        addr.parse::<Ipv6Addr>().map_err(|_| bad(&format!("'{addr}' is not an IPv6 address")))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after the IPv6 address"))?),
        };
        (addr, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host_ok = !host.is_empty()
        && (host.contains(':') || host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
    if !host_ok {
        return Err(bad("the host is missing or not a name or an address"));
    }
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad(&format!("port '{p}' is not 1-65535"))),
        },
    };
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let prefix = path.trim_end_matches('/');
    let events_path = format!("{prefix}/v1/events");
    if events_path.parse::<hyper::Uri>().is_err() {
        return Err(bad(&format!("path '{prefix}' is not a valid URL path")));
    }
    Ok(Endpoint { host: host.into(), port, authority, events_path, tls })
}

/// How one POST ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// 2xx other than 200: stored.
    Stored,
    /// 200: the controller already had it.
    Duplicate,
    /// 4xx other than 401, 403, 408 and 429: this event will never be accepted.
    Rejected { status: u16, body: String },
    /// Anything else: try again later.
    Retry(String),
}

/// What a status means for the entry.
pub(crate) fn classify(status: StatusCode) -> Option<Delivery> {
    match status.as_u16() {
        200 => Some(Delivery::Duplicate),
        201..=299 => Some(Delivery::Stored),
        // A wrong token or a node name the token does not cover: the operator fixes the
        // node's configuration, and the events are still in the spool.
        401 | 403 | 408 | 429 => None,
        400..=499 => Some(Delivery::Rejected { status: status.as_u16(), body: String::new() }),
        _ => None,
    }
}

/// POSTs one event, the whole exchange (resolution and connection included) within `timeout`.
pub(crate) async fn post_event(link: &Link, key: &str, body: Bytes, timeout: Duration) -> Delivery {
    match tokio::time::timeout(timeout, post(link, key, body)).await {
        Err(_) => Delivery::Retry(format!("no answer within {}", crate::units::format_duration(timeout))),
        Ok(Err(e)) => Delivery::Retry(e),
        Ok(Ok((status, text))) => match classify(status) {
            Some(Delivery::Rejected { status, .. }) => Delivery::Rejected { status, body: text },
            Some(d) => d,
            None if matches!(status.as_u16(), 401 | 403) => Delivery::Retry(format!(
                "controller answered {status}: {}; check controller.token_file (the token `acpimon token add` printed for this node's name)",
                text.trim()
            )),
            None => Delivery::Retry(format!("controller answered {status}: {}", text.trim())),
        },
    }
}

async fn post(link: &Link, key: &str, body: Bytes) -> Result<(StatusCode, String), String> {
    let ep = &link.endpoint;
    let stream = connect(ep).await?;
    match &link.tls {
        None => exchange(link, stream, key, body).await,
        Some(tls) => {
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("'{}' cannot be a TLS server name: {e}", ep.host))?;
            let stream = tls.connect(name, stream).await.map_err(|e| tls_error(ep, &e))?;
            exchange(link, stream, key, body).await
        }
    }
}

/// Names a failed handshake's cause and its fix.
fn tls_error(ep: &Endpoint, e: &io::Error) -> String {
    format!("TLS handshake with {}: {e}{}", ep.authority, tls_fix(e))
}

/// What to do about the TLS error somewhere in `e`'s chain of causes ("" if none is).
fn tls_fix(e: &(dyn std::error::Error + 'static)) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error as TlsError};
    let mut cause = Some(e);
    while let Some(c) = cause {
        let found = c.downcast_ref::<TlsError>().or_else(|| {
            c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()?.downcast_ref::<TlsError>())
        });
        if let Some(tls) = found {
            return match tls {
                TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    "; the controller's certificate is not signed by a CA this node trusts: set controller.ca_file to its CA"
                }
                TlsError::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => "; the controller's certificate is outside its validity period: renew it (or check the clocks)",
                TlsError::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => "; the controller's certificate does not name this host: use the name it was issued for in controller.url",
                TlsError::AlertReceived(AlertDescription::CertificateRequired | AlertDescription::BadCertificate)
                | TlsError::AlertReceived(AlertDescription::UnknownCA) => {
                    "; the controller wants a client certificate it trusts: set controller.client_cert and client_key"
                }
                _ => "",
            };
        }
        cause = c.source();
    }
    ""
}

async fn exchange<S>(link: &Link, stream: S, key: &str, body: Bytes) -> Result<(StatusCode, String), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ep = &link.endpoint;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {}: {e}", ep.authority))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let mut req = Request::post(ep.events_path.as_str());
        if let Some(token) = &link.token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .header(HOST, ep.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .header(CONNECTION, "close")
            .body(Full::new(body))
            .expect("a request of valid parts");
        let resp = match sender.send_request(req).await {
            Ok(resp) => resp,
            Err(e) => return Err(e),
        };
        let status = resp.status();
        // The body only matters for a refusal's record; a huge or broken one is summarised.
        let text = match Limited::new(resp.into_body(), MAX_RESPONSE).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => format!("(response body unreadable: {e})"),
        };
        Ok((status, text))
    }
    .await;
    match result {
        Ok(answer) => {
            conn.abort();
            Ok(answer)
        }
        // A refusal in TLS 1.3 (a client certificate missing or not trusted) arrives as an
        // alert after the handshake: the connection's own error says which.
        Err(e) => {
            let why = match tokio::time::timeout(Duration::from_secs(1), conn).await {
                Ok(Ok(Err(conn_error))) => {
                    format!("{conn_error}{}", tls_fix(&conn_error))
                }
                _ => format!("{e}{}", tls_fix(&e)),
            };
            Err(format!("request to {}: {why}", ep.authority))
        }
    }
}

async fn connect(ep: &Endpoint) -> Result<TcpStream, String> {
    let addrs = tokio::net::lookup_host((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", ep.host))?;
    let mut last = format!("{} resolves to no address", ep.host);
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str) -> Endpoint {
        parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn plain(endpoint: Endpoint) -> Link {
        Link { endpoint, tls: None, token: None }
    }

    #[test]
    fn parses_hosts_ports_and_prefixes() {
        let e = ep("http://ctl.example:8080");
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("ctl.example", 8080, "ctl.example:8080")
        );
        assert_eq!(e.events_path, "/v1/events");
        let e = ep("HTTP://10.0.0.1/");
        assert_eq!((e.host.as_str(), e.port, e.events_path.as_str()), ("10.0.0.1", 80, "/v1/events"));
        let e = ep("http://10.0.0.1:9/acpimon/api//");
        assert_eq!(e.events_path, "/acpimon/api/v1/events");
        let e = ep("http://[::1]:7000/p");
        assert_eq!((e.host.as_str(), e.port, e.authority.as_str()), ("::1", 7000, "[::1]:7000"));
        assert_eq!(e.events_path, "/p/v1/events");
        assert_eq!(ep("http://[fe80::1]").port, 80);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let e = ep("HTTPS://ctl");
        assert!(e.tls && e.port == 443 && e.authority == "ctl:443", "{e:?}");
        assert!(!ep("http://ctl").tls);
        for (url, why) in [
            ("ctl:8080", "http://"),
            ("ftp://ctl", "http or https"),
            ("http://", "host"),
            ("http://:80", "host"),
            ("http://ctl:0", "port"),
            ("http://ctl:65536", "port"),
            ("http://ctl:+80", "port"),
            ("http://ctl:80:90", "port"),
            ("http://ctl:", "port"),
            ("http://user@ctl", "user"),
            ("http://ctl/x?y=1", "query"),
            ("http://ctl/x#f", "query"),
            ("http://ctl/a b", "' '"),
            ("http://[::1", "']'"),
            ("http://[nope]:80", "IPv6"),
            ("http://[::1]x", "junk"),
            ("http://ct%l", "host"),
        ] {
            let msg = parse_url(url).expect_err(url).to_string();
            assert!(msg.contains(why) && msg.contains("http[s]://HOST[:PORT][/PATH]"), "{url}: {msg}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(StatusCode::OK), Some(Delivery::Duplicate));
        assert_eq!(classify(StatusCode::CREATED), Some(Delivery::Stored));
        assert_eq!(classify(StatusCode::NO_CONTENT), Some(Delivery::Stored));
        assert!(matches!(classify(StatusCode::BAD_REQUEST), Some(Delivery::Rejected { status: 400, .. })));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE),
            Some(Delivery::Rejected { status: 413, .. })
        ));
        for retry in [401, 403, 408, 429, 500, 502, 503, 301, 100] {
            assert_eq!(classify(StatusCode::from_u16(retry).unwrap()), None, "{retry}");
        }
    }

    /// A one-shot server: captures the request's head and body, answers `answer`.
    async fn capture(answer: &'static str) -> (Endpoint, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = ep(&format!("http://{}/pre/fix/", listener.local_addr().unwrap()));
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Head, then as many body bytes as Content-Length says.
            loop {
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string)
                        })
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= len || n == 0 {
                        break;
                    }
                }
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(buf).unwrap()
        });
        (e, task)
    }

    #[tokio::test]
    async fn posts_with_the_idempotency_key_to_the_prefixed_path() {
        let (e, server) = capture("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n").await;
        let d = post_event(
            &plain(e.clone()),
            "k-1",
            Bytes::from_static(b"{\"key\":\"k-1\"}"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(d, Delivery::Stored);
        let req = server.await.unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("POST /pre/fix/v1/events HTTP/1.1"));
        let headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
        for h in ["idempotency-key: k-1", "content-type: application/json", &format!("host: {}", e.authority)]
        {
            assert!(headers.iter().any(|l| l == h), "{h} missing in {headers:?}");
        }
        assert_eq!(body, "{\"key\":\"k-1\"}");

        let (e, server) = capture("HTTP/1.1 422 Unprocessable\r\ncontent-length: 4\r\n\r\nnope").await;
        let d = post_event(&plain(e.clone()), "k", Bytes::from_static(b"{}"), Duration::from_secs(5)).await;
        assert_eq!(d, Delivery::Rejected { status: 422, body: "nope".into() });
        server.await.unwrap();
        let (e, server) = capture("HTTP/1.1 503 Busy\r\ncontent-length: 5\r\n\r\nlater").await;
        let d = post_event(&plain(e.clone()), "k", Bytes::from_static(b"{}"), Duration::from_secs(5)).await;
        assert!(matches!(&d, Delivery::Retry(m) if m.contains("503")), "{d:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_controller_is_a_retry() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = ep(&format!("http://127.0.0.1:{port}"));
        let d = post_event(&plain(e.clone()), "k", Bytes::from_static(b"{}"), Duration::from_secs(2)).await;
        assert!(matches!(&d, Delivery::Retry(m) if m.contains("cannot connect")), "{d:?}");
    }
}

//! The reference controller: `acpimon controller --listen ADDR --store DIR`.
//!
//! The smallest server that honours the forwarding protocol, for tests, demos and single-node
//! use; a fleet would put its own service behind the same three rules:
//!
//! - `POST /v1/events` with one event as JSON (at most 1 MiB, else 413), of any kind: kinds
//!   this build does not know (a newer node's) are stored as received ([`RawEvent`]). The key (1-64
//!   characters of `[0-9A-Za-z_-]`) must match the `Idempotency-Key` header when one is sent,
//!   else 400. A new event is stored durably *before* the answer **201**; an event already
//!   stored is answered **200** and counted as a duplicate. The sender deletes its spool entry
//!   on either, so a duplicate is the normal outcome of a crash or a lost reply.
//! - 4xx (but 408 and 429) means "never send this again"; 5xx, 408 and 429 mean "later".
//! - `GET /v1/events` lists the stored events in arrival order, `GET /v1/stats` gives
//!   `{"stored": N, "duplicates": M, "unauthorized": U, "forbidden": F}`, `GET /healthz`
//!   answers `ok`.
//!
//! With `--tokens FILE` ([`auth`]) every request but `/healthz` needs a bearer token:
//! a node's to post (and only events whose `node` is its name: else 403), an operator's to
//! read. A missing or unknown token is 401. Both are counted. With `--tls-cert` and
//! `--tls-key` the controller speaks only TLS (`--tls-client-ca` also requires client
//! certificates). Listening beyond loopback needs both TLS and tokens: plain HTTP is for the
//! demo and tests on 127.0.0.1. A request body must arrive within [`BODY_TIMEOUT`] (408).
//!
//! The store ([`store`]): SQLite in `--store DIR/controller.db` by default, or PostgreSQL with
//! `--database postgres://...`; a JSON-file store found in `--store` (what this controller kept
//! before) is imported once at start. `GET /v1/events/KEY` gives one stored event (404 if
//! none). The analyzer's output and exit status go to `--store DIR/analysis/<key>.txt`.
//! Everything a client sends is untrusted: bounded, validated, answered with a status, never a
//! panic.

pub mod auth;
pub mod store;
pub mod web;

use std::convert::Infallible;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::event::{valid_key, RawEvent, MAX_KEY_LEN};
use crate::util::process::{Output, Program};
use auth::{Refusal, Role, Tokens};
use store::{Backend, Inserted, NewEvent, Store, StoreError};

/// The largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Analyzers running at once; more wait their turn.
const MAX_ANALYZERS: usize = 4;
/// A request body must have arrived within this (a client trickling it is cut with 408).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    pub listen: SocketAddr,
    /// The store directory (created if missing): the SQLite store, analyses, and a JSON-file
    /// store to import.
    pub store: PathBuf,
    /// A PostgreSQL URL (`postgres://...`) to store events in instead of SQLite.
    pub database: Option<String>,
    /// Program and arguments run for each new event (event JSON on stdin, `ACPIMON_EVENT_KEY`,
    /// `ACPIMON_EVENT_KIND`, `ACPIMON_VM` in the environment); output to `analysis/<key>.txt`.
    pub analyzer: Option<Vec<String>>,
    pub analyzer_timeout: Duration,
    /// Serve TLS with this certificate and key.
    pub tls: Option<crate::util::tls::ServerTls>,
    /// The token file; without one, anyone who can connect may post and read.
    pub tokens: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0} is not a loopback address, and the controller would speak plain HTTP there; give --tls-cert and --tls-key, or listen on 127.0.0.1")]
    PlainBeyondLoopback(SocketAddr),
    #[error("{0} is not a loopback address, and the controller would take events from anyone who can connect; give --tokens FILE (`acpimon token add NODE --tokens FILE`), or listen on 127.0.0.1")]
    OpenBeyondLoopback(SocketAddr),
    #[error("controller TLS: {0}")]
    Tls(#[from] crate::util::tls::TlsError),
    #[error(transparent)]
    Tokens(#[from] auth::AuthError),
    #[error("cannot listen on {addr}: {source}; pick a free port or an address of this host with --listen")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot use store {path}: {source}; check that the directory is writable")]
    Store { path: PathBuf, source: io::Error },
    #[error("the analyzer command is empty; give the program and its arguments")]
    EmptyAnalyzer,
    #[error(transparent)]
    Backend(#[from] StoreError),
}

/// Serves until `shutdown` turns true (or its sender is dropped); then stops accepting, drops
/// open connections and returns. `ready` gets the bound address (useful with port 0).
pub async fn serve(
    opts: ControllerOptions,
    shutdown: watch::Receiver<bool>,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), ControllerError> {
    if opts.analyzer.as_ref().is_some_and(|a| a.first().is_none_or(|p| p.is_empty())) {
        return Err(ControllerError::EmptyAnalyzer);
    }
    if !opts.listen.ip().is_loopback() {
        if opts.tls.is_none() {
            return Err(ControllerError::PlainBeyondLoopback(opts.listen));
        }
        if opts.tokens.is_none() {
            return Err(ControllerError::OpenBeyondLoopback(opts.listen));
        }
    }
    let tls = opts.tls.as_ref().map(|t| t.config()).transpose()?.map(tokio_rustls::TlsAcceptor::from);
    let tokens = opts.tokens.as_deref().map(Tokens::open).transpose()?;
    let backend = Backend::from_options(&opts.store, opts.database.as_deref())?;
    let root = opts.store.clone();
    tokio::task::spawn_blocking(move || fs::create_dir_all(root.join("analysis")))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
        .map_err(|source| ControllerError::Store { path: opts.store.clone(), source })?;
    let store = Store::open(&backend).await?;
    store.import_json_store(&opts.store).await?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ControllerError::Bind { addr: opts.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ControllerError::Bind { addr: opts.listen, source })?;
    let ctx = Arc::new(Ctx {
        store,
        root: opts.store,
        analyzer: opts.analyzer,
        analyzer_timeout: opts.analyzer_timeout,
        analyzers: Arc::new(Semaphore::new(MAX_ANALYZERS)),
        tokens,
        unauthorized: AtomicU64::new(0),
        forbidden: AtomicU64::new(0),
    });
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    let handler = move |req| handle(ctx.clone(), req);
    crate::util::http::serve_tls(listener, "controller", handler, shutdown, tls).await;
    Ok(())
}

struct Ctx {
    store: Store,
    /// The store directory (analyses).
    root: PathBuf,
    analyzer: Option<Vec<String>>,
    analyzer_timeout: Duration,
    analyzers: Arc<Semaphore>,
    tokens: Option<Tokens>,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
}

impl Ctx {
    /// Who sent `req`, if a token file is in force: `Ok(None)` without one, else the token's
    /// entry, or the refusal as a response (counted).
    fn authorize<B>(&self, req: &Request<B>, role: Role) -> Result<Option<auth::TokenEntry>, Box<Resp>> {
        let Some(tokens) = &self.tokens else { return Ok(None) };
        let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        tokens.check(header, role).map(Some).map_err(|r| Box::new(self.refuse(r)))
    }

    fn refuse(&self, refusal: Refusal) -> Resp {
        match refusal {
            Refusal::Unauthorized(why) => {
                self.unauthorized.fetch_add(1, Ordering::Relaxed);
                let mut r = error(StatusCode::UNAUTHORIZED, why);
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Refusal::Forbidden(why) => {
                self.forbidden.fetch_add(1, Ordering::Relaxed);
                error(StatusCode::FORBIDDEN, why)
            }
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A body already JSON.
fn respond_raw(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The store failed: 503, which senders retry.
fn unavailable(e: &StoreError) -> Resp {
    tracing::error!(error = %e, "controller: the store failed");
    error(StatusCode::SERVICE_UNAVAILABLE, format!("the store failed: {e}"))
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    respond(status, json!({ "error": message.into() }))
}

fn not_allowed(allow: &'static str) -> Resp {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}"));
    r.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Routes one request. Generic over the body so tests can drive it without a socket.
async fn handle<B>(ctx: Arc<Ctx>, req: Request<B>) -> Result<Resp, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let get = req.method() == Method::GET;
    let path = req.uri().path();
    let page = get && (path == "/" || path.starts_with("/vm/") || path.starts_with("/incident/"));
    if get && (page || path.starts_with("/v1/events") || path == "/v1/stats") {
        if let Err(mut refused) = ctx.authorize(&req, Role::Operator) {
            if page && refused.status() == StatusCode::UNAUTHORIZED {
                // A browser asks for credentials: any user name, the operator's token as the
                // password.
                refused.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"acpimon controller\", charset=\"UTF-8\""),
                );
            }
            return Ok(*refused);
        }
    }
    Ok(match path {
        "/v1/events" if req.method() == Method::POST => post_event(&ctx, req).await,
        "/v1/events" if get => match ctx.store.all_json().await {
            Ok(events) => respond_raw(StatusCode::OK, format!("[{}]", events.join(","))),
            Err(e) => unavailable(&e),
        },
        "/v1/events" => not_allowed("GET, POST"),
        path if path.starts_with("/v1/events/") => {
            let key = &path["/v1/events/".len()..];
            if !get {
                not_allowed("GET")
            } else if !valid_key(key) {
                error(
                    StatusCode::NOT_FOUND,
                    format!("no event '{key}': a key is 1-{MAX_KEY_LEN} characters of [0-9A-Za-z_-]"),
                )
            } else {
                match ctx.store.event(key).await {
                    Ok(Some(ev)) => respond_raw(StatusCode::OK, ev.body),
                    Ok(None) => error(StatusCode::NOT_FOUND, format!("no event '{key}' stored")),
                    Err(e) => unavailable(&e),
                }
            }
        }
        "/v1/stats" if get => match ctx.store.counts().await {
            Ok(c) => respond(
                StatusCode::OK,
                json!({
                    "stored": c.stored,
                    "duplicates": c.duplicates,
                    "unauthorized": ctx.unauthorized.load(Ordering::Relaxed),
                    "forbidden": ctx.forbidden.load(Ordering::Relaxed),
                }),
            ),
            Err(e) => unavailable(&e),
        },
        "/healthz" if get => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        "/v1/stats" | "/healthz" => not_allowed("GET"),
        path if get && (path == "/" || path.starts_with("/vm/") || path.starts_with("/incident/")) => {
            pages(&ctx, path, req.uri().query()).await
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint; see /, /v1/events, /v1/stats, /healthz"),
    })
}

fn html(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

/// The operator's pages ([`web`]).
async fn pages(ctx: &Ctx, path: &str, query: Option<&str>) -> Resp {
    let now = store::now_ms();
    let not_found =
        |what: String| html(StatusCode::NOT_FOUND, format!("<!DOCTYPE html><p>{}</p>", web::esc(&what)));
    let result = async {
        if path == "/" {
            let filter = store::FleetFilter {
                state: web::query_param(query, "state"),
                node: web::query_param(query, "node"),
            };
            let rows = ctx.store.fleet(&filter).await?;
            let mut nodes: Vec<String> = if filter.node.is_some() || filter.state.is_some() {
                ctx.store.fleet(&store::FleetFilter::default()).await?.into_iter().map(|r| r.node).collect()
            } else {
                rows.iter().map(|r| r.node.clone()).collect()
            };
            nodes.dedup();
            return Ok(html(StatusCode::OK, web::fleet(&rows, &filter, &nodes, now)));
        }
        if let Some(rest) = path.strip_prefix("/vm/") {
            let Some((node, vm)) =
                rest.split_once('/').and_then(|(n, v)| Some((web::unseg(n)?, web::unseg(v)?)))
            else {
                return Ok(not_found(format!("no VM at {path}: the address is /vm/NODE/VM")));
            };
            let vm = if vm == "-" { String::new() } else { vm };
            let hours = web::query_param(query, "hours")
                .and_then(|h| h.parse::<u32>().ok())
                .unwrap_or(web::DEFAULT_HOURS)
                .clamp(1, web::MAX_HOURS);
            let from = now - i64::from(hours) * 3_600_000;
            let events = ctx.store.vm_events(&node, &vm, from, now + 60_000, 2_000).await?;
            let latency = ctx.store.latency(&node, &vm, from, now + 60_000).await?;
            if events.is_empty() && latency.is_empty() {
                let any = ctx.store.vm_events(&node, &vm, 0, i64::MAX, 1).await?;
                if any.is_empty() {
                    return Ok(not_found(format!("no events of {node}/{vm} are stored")));
                }
            }
            return Ok(html(StatusCode::OK, web::vm(&node, &vm, &events, &latency, hours, now)));
        }
        let key = path.strip_prefix("/incident/").unwrap_or_default();
        if !valid_key(key) {
            return Ok(not_found(format!("no incident '{key}'")));
        }
        // The incident's own key, or an event's (its bundle's) that names it.
        let incident = match ctx.store.event(key).await? {
            Some(e) => e.incident.unwrap_or(e.key),
            None => return Ok(not_found(format!("no event '{key}' is stored"))),
        };
        let events = ctx.store.incident(&incident).await?;
        Ok(html(StatusCode::OK, web::incident(&incident, &events)))
    };
    match result.await {
        Ok(r) => r,
        Err(e) => unavailable(&e),
    }
}

async fn post_event<B>(ctx: &Arc<Ctx>, req: Request<B>) -> Resp
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let sender = match ctx.authorize(&req, Role::Node) {
        Ok(sender) => sender,
        Err(refused) => return *refused,
    };
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY} bytes"));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let header_key = match req.headers().get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if valid_key(k) => Some(k.to_string()),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("Idempotency-Key is not 1-{MAX_KEY_LEN} characters of [0-9A-Za-z_-]"),
            )
        }
    };
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await {
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {}", crate::units::format_duration(BODY_TIMEOUT)),
                )
            }
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
            Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")),
        };
    let event: RawEvent = match serde_json::from_slice(&body) {
        Ok(ev) => ev,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not an event: {e}")),
    };
    if !valid_key(&event.key) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("key is not 1-{MAX_KEY_LEN} characters of [0-9A-Za-z_-]"),
        );
    }
    if header_key.as_ref().is_some_and(|k| *k != event.key) {
        return error(StatusCode::BAD_REQUEST, "Idempotency-Key differs from the event's key");
    }
    if let Some(sender) = sender.filter(|s| s.name != event.node) {
        return ctx.refuse(Refusal::Forbidden(format!(
            "the token is {}'s, and this event is node {}'s; a node posts only its own events",
            sender.name, event.node
        )));
    }
    let json = match serde_json::to_string(&event) {
        Ok(j) => j,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("event cannot be stored: {e}")),
    };
    let row = NewEvent::from_raw(&event, json.clone(), store::now_ms());
    match ctx.store.insert(row, true).await {
        Ok(Inserted::New) => {
            if let Some(argv) = &ctx.analyzer {
                tokio::spawn(analyze(ctx.clone(), argv.clone(), event.clone(), json.into_bytes()));
            }
            respond(StatusCode::CREATED, json!({ "key": event.key, "stored": true }))
        }
        Ok(Inserted::Duplicate) => respond(StatusCode::OK, json!({ "key": event.key, "duplicate": true })),
        Err(e) => unavailable(&e),
    }
}

/// Runs the analyzer for a stored event; writes `analysis/<key>.txt` (output, then the exit
/// status) through a temporary file, so a present file is a finished analysis.
async fn analyze(ctx: Arc<Ctx>, argv: Vec<String>, event: RawEvent, json: Vec<u8>) {
    let Ok(_permit) = ctx.analyzers.acquire().await else { return };
    let dir = ctx.root.join("analysis");
    let tmp = dir.join(format!(".{}.txt.tmp", event.key));
    let target = dir.join(format!("{}.txt", event.key));
    let opened = File::create(&tmp).and_then(|f| Ok((f.try_clone()?, f.try_clone()?, f)));
    let (out, err, mut file) = match opened {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(path = %tmp.display(), error = %e, "controller: cannot write the analysis");
            return;
        }
    };
    let env = event.hook_env();
    let outcome = Program::new(&argv, ctx.analyzer_timeout)
        .input(&json)
        .env(env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(v))))
        .output(Output::To { stdout: out.into(), stderr: err.into() })
        .run()
        .await
        .outcome;
    let finished = writeln!(file, "\n[acpimon] analyzer {}: {outcome}", argv[0])
        .and_then(|()| fs::rename(&tmp, &target));
    if let Err(e) = finished {
        tracing::error!(path = %target.display(), error = %e, "controller: cannot write the analysis");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ctx(root: &std::path::Path) -> Arc<Ctx> {
        Arc::new(Ctx {
            store: Store::open(&Backend::Sqlite(root.into())).await.unwrap(),
            root: root.into(),
            analyzer: None,
            analyzer_timeout: Duration::from_secs(1),
            analyzers: Arc::new(Semaphore::new(1)),
            tokens: None,
            unauthorized: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
        })
    }

    async fn call(
        ctx: &Arc<Ctx>,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = handle(ctx.clone(), req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// An event of a kind this build does not know: stored all the same.
    fn event(key: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"key": key, "time": "t", "node": "n", "vm": "vm", "kind": "test", "n": 1}))
            .unwrap()
    }

    #[tokio::test]
    async fn stores_dedups_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path()).await;
        assert_eq!(call(&c, "POST", "/v1/events", Some("k1"), event("k1")).await.0, 201);
        assert_eq!(call(&c, "POST", "/v1/events", None, event("k1")).await.0, 200);
        assert_eq!(call(&c, "POST", "/v1/events", None, event("k2")).await.0, 201);
        for (key, body, why) in [
            (Some("k3"), event("k4"), "differs"),
            (Some("a b"), event("a b"), "Idempotency-Key"),
            (None, event("../etc"), "key is not"),
            (None, event(&"k".repeat(65)), "key is not"),
            (None, event(""), "key is not"),
            (None, b"{".to_vec(), "not an event"),
            (None, b"[]".to_vec(), "not an event"),
            (None, br#"{"key":"k5","time":"t","node":"n","kind":"k","kind":"x"}"#.to_vec(), "not an event"),
            (None, vec![0xff; 10], "not an event"),
        ] {
            let (status, text) = call(&c, "POST", "/v1/events", key, body).await;
            assert_eq!(status, 400, "{text}");
            assert!(text.contains(why), "{why}: {text}");
        }
        // Over 1 MiB without a Content-Length: the streaming limit answers.
        let (status, _) = call(&c, "POST", "/v1/events", None, vec![b' '; MAX_BODY + 1]).await;
        assert_eq!(status, 413);
        assert_eq!(
            call(&c, "GET", "/v1/stats", None, vec![]).await,
            (200, r#"{"duplicates":1,"forbidden":0,"stored":2,"unauthorized":0}"#.into())
        );
        assert_eq!(call(&c, "GET", "/nope", None, vec![]).await.0, 404);
        assert_eq!(call(&c, "DELETE", "/v1/events", None, vec![]).await.0, 405);
        assert_eq!(call(&c, "POST", "/healthz", None, vec![]).await.0, 405);
        assert_eq!(call(&c, "GET", "/healthz", None, vec![]).await, (200, "ok\n".into()));
    }

    #[tokio::test]
    async fn restart_keeps_events_counts_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        {
            let c = ctx(root).await;
            for k in ["a", "c", "b"] {
                assert_eq!(call(&c, "POST", "/v1/events", None, event(k)).await.0, 201);
            }
            assert_eq!(call(&c, "POST", "/v1/events", None, event("a")).await.0, 200);
        }
        let c = ctx(root).await;
        let (_, list) = call(&c, "GET", "/v1/events", None, vec![]).await;
        let keys: Vec<String> =
            serde_json::from_str::<Vec<RawEvent>>(&list).unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["a", "c", "b"], "arrival order");
        assert_eq!(call(&c, "POST", "/v1/events", None, event("b")).await.0, 200);
        let stats: Value = serde_json::from_str(&call(&c, "GET", "/v1/stats", None, vec![]).await.1).unwrap();
        assert_eq!(stats, json!({"stored": 3, "duplicates": 2, "unauthorized": 0, "forbidden": 0}));
        let (status, one) = call(&c, "GET", "/v1/events/c", None, vec![]).await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&one).unwrap()),
            (200, serde_json::from_slice(&event("c")).unwrap())
        );
        assert_eq!(call(&c, "GET", "/v1/events/zz", None, vec![]).await.0, 404);
        assert_eq!(call(&c, "GET", "/v1/events/..", None, vec![]).await.0, 404);
        assert_eq!(call(&c, "POST", "/v1/events/c", None, vec![]).await.0, 405);
    }
}

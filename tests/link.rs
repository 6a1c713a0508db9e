//! The link between a node and its controller, secured: TLS (rustls on both sides, with
//! certificates from a test CA) and per-node bearer tokens. A real Forwarder posts to the real
//! controller over TCP on 127.0.0.1; refusals are clear, counted, and lose nothing that was
//! accepted (refused events stay in the node's spool until the operator fixes the link).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acpimon::controller::auth::{self, Role};
use acpimon::controller::{ControllerError, ControllerOptions};
use acpimon::event::{self, EventKind};
use acpimon::forward::{ControllerConfig, Event, ForwardConfig, ForwardTask, Forwarder};
use acpimon::util::tls::ServerTls;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// A test CA: its certificate (PEM file) and what it issues.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("acpimon test CA {name}"));
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// A certificate for `names`, valid from `from` to `to` (years), as (cert, key) files.
    fn issue(&self, dir: &Path, file: &str, names: &[&str], years: (i32, i32)) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

const VALID: (i32, i32) = (2020, 2100);

type Controller = common::inproc::Running;

async fn start(
    store: &Path,
    tls: Option<ServerTls>,
    tokens: Option<&Path>,
) -> Result<Controller, ControllerError> {
    start_on("127.0.0.1:0".parse().unwrap(), store, tls, tokens).await
}

async fn start_on(
    listen: SocketAddr,
    store: &Path,
    tls: Option<ServerTls>,
    tokens: Option<&Path>,
) -> Result<Controller, ControllerError> {
    let tokens = tokens.map(Path::to_path_buf);
    Controller::start(ControllerOptions { tls, tokens, ..common::inproc::options(listen, store) }).await
}

fn node_event(node: &str, i: usize) -> Event {
    let kind = EventKind::VmRemoved(event::VmRemoved { dir: format!("/run/acpimon/vm{i}").into() });
    Event::new(event::new_key(), node, Some("vm0"), kind)
}

fn forward_config(dir: &Path, url: &str, tweak: impl FnOnce(&mut ControllerConfig)) -> ForwardConfig {
    let mut c = ControllerConfig {
        url: url.into(),
        ca_file: None,
        client_cert: None,
        client_key: None,
        token_file: None,
        timeout: Duration::from_secs(3),
        spool_max_bytes: 1 << 20,
        spool_max_events: 100,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
    };
    tweak(&mut c);
    ForwardConfig {
        log: None,
        spool_dir: dir.join("spool"),
        controller: Some(c),
        hook: None,
        hold: acpimon::forward::HoldLimits::default(),
    }
}

/// Runs a Forwarder on `cfg` (resending what its spool holds), submits `events`, and waits
/// until `expect` events are delivered or `attempts` attempts failed; returns (delivered, the
/// last error).
async fn send(cfg: ForwardConfig, events: &[Event], expect: u64, attempts: u64) -> (u64, Option<String>) {
    let (fw, task): (Forwarder, ForwardTask) =
        Forwarder::open(cfg).expect("a valid forwarding configuration");
    let (stop, rx) = watch::channel(false);
    let running = tokio::spawn(task.run(rx));
    for e in events {
        fw.submit(e).unwrap();
    }
    let start = Instant::now();
    loop {
        let s = fw.stats();
        if s.delivered + s.duplicates_acknowledged >= expect || s.attempts_failed >= attempts {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no delivery and no failure: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = fw.stats();
    stop.send(true).unwrap();
    running.await.unwrap();
    (s.delivered + s.duplicates_acknowledged, s.last_error)
}

/// A GET with an optional bearer token, over TLS when `ca` is given; (status, body).
async fn get(addr: SocketAddr, path: &str, token: Option<&str>, ca: Option<&Path>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\r\n");
    exchange(addr, req.as_bytes(), ca).await
}

async fn exchange(addr: SocketAddr, req: &[u8], ca: Option<&Path>) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    match ca {
        None => {
            let mut s = tcp;
            s.write_all(req).await.unwrap();
            let _ = s.read_to_end(&mut buf).await;
        }
        Some(ca) => {
            let tls = acpimon::util::tls::ClientTls { ca_file: Some(ca.into()), client_cert: None };
            let connector = tokio_rustls::TlsConnector::from(tls.config().unwrap());
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = connector.connect(name, tcp).await.expect("TLS handshake");
            s.write_all(req).await.unwrap();
            let _ = s.read_to_end(&mut buf).await;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string())
}

fn stats(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_admit_each_node_for_itself_only_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "good");
    let (cert, key) = ca.issue(d, "server", &["localhost", "127.0.0.1"], VALID);
    let tokens = d.join("tokens.toml");
    let edge1 = auth::add(&tokens, "edge-1", Role::Node).unwrap();
    let edge2 = auth::add(&tokens, "edge-2", Role::Node).unwrap();
    let operator = auth::add(&tokens, "ops", Role::Operator).unwrap();
    let ctl =
        start(&d.join("store"), Some(ServerTls { cert, key, client_ca: None }), Some(&tokens)).await.unwrap();
    let url = format!("https://localhost:{}", ctl.addr.port());
    let token_file = |name: &str, token: &str| {
        let p = d.join(format!("{name}.token"));
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p
    };
    let with = |ca_file: &Path, token: PathBuf| {
        let ca_file = ca_file.to_path_buf();
        move |c: &mut ControllerConfig| {
            c.ca_file = Some(ca_file);
            c.token_file = Some(token);
        }
    };

    // edge-1 with its own token: delivered over TLS.
    let ev1: Vec<Event> = (0..3).map(|i| node_event("edge-1", i)).collect();
    let (n, err) =
        send(forward_config(&d.join("n1"), &url, with(&ca.pem, token_file("e1", &edge1))), &ev1, 3, 1).await;
    assert_eq!((n, err), (3, None));

    // edge-2 with a wrong token: 401 every time, counted, and its events stay in its spool.
    let ev2: Vec<Event> = (0..2).map(|i| node_event("edge-2", i)).collect();
    let n2 = d.join("n2");
    let (n, err) =
        send(forward_config(&n2, &url, with(&ca.pem, token_file("bad", "not-a-token"))), &ev2, 2, 2).await;
    let err = err.expect("an error");
    assert_eq!(n, 0);
    assert!(err.contains("401") && err.contains("token_file"), "{err}");
    // edge-2 presenting edge-1's token: its events name edge-2, so 403.
    let (n, err) = send(forward_config(&n2, &url, with(&ca.pem, token_file("e1b", &edge1))), &[], 2, 1).await;
    let err = err.expect("an error");
    assert_eq!(n, 0);
    assert!(err.contains("403") && err.contains("edge-1's") && err.contains("edge-2's"), "{err}");
    // Fixed: the same spool now delivers both, once.
    let (n, err) = send(forward_config(&n2, &url, with(&ca.pem, token_file("e2", &edge2))), &[], 2, 1).await;
    assert_eq!((n, err), (2, None));

    // Reading needs an operator's token; a node's is forbidden, none is unauthorized.
    assert_eq!(get(ctl.addr, "/v1/events", None, Some(&ca.pem)).await.0, 401);
    assert_eq!(get(ctl.addr, "/v1/events", Some(&edge1), Some(&ca.pem)).await.0, 403);
    let (status, body) = get(ctl.addr, "/v1/events", Some(&operator), Some(&ca.pem)).await;
    assert_eq!(status, 200, "{body}");
    let stored: Vec<Value> = serde_json::from_str(&body).unwrap();
    let mut nodes: Vec<&str> = stored.iter().map(|e| e["node"].as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["edge-1", "edge-1", "edge-1", "edge-2", "edge-2"]);
    let (status, body) = get(ctl.addr, "/v1/stats", Some(&operator), Some(&ca.pem)).await;
    assert_eq!(status, 200);
    let s = stats(&body);
    assert!(s["unauthorized"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["forbidden"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["stored"], 5, "{s}");
    // The operator's pages: a browser is asked for credentials (Basic, the token as the
    // password), a node's token is not enough.
    let (status, body) = get(ctl.addr, "/", None, Some(&ca.pem)).await;
    assert_eq!(status, 401, "{body}");
    use base64::Engine;
    let basic = |t: &str| base64::engine::general_purpose::STANDARD.encode(format!("ops:{t}"));
    let page = |t: String| {
        format!("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Basic {t}\r\n\r\n")
    };
    let (status, body) = exchange(ctl.addr, page(basic(&operator)).as_bytes(), Some(&ca.pem)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<h1>Fleet</h1>") && body.contains("edge-2"), "{body}");
    assert_eq!(exchange(ctl.addr, page(basic(&edge1)).as_bytes(), Some(&ca.pem)).await.0, 403);
    // /healthz stays open (for probes), and plain HTTP on the TLS port gets no answer.
    assert_eq!(get(ctl.addr, "/healthz", None, Some(&ca.pem)).await.0, 200);
    assert_eq!(get(ctl.addr, "/healthz", None, None).await.0, 0);

    // A revoked token is refused at once, without a restart.
    auth::remove(&tokens, "edge-1").unwrap();
    let (n, err) = send(
        forward_config(&d.join("n3"), &url, with(&ca.pem, token_file("e1c", &edge1))),
        &[node_event("edge-1", 9)],
        1,
        1,
    )
    .await;
    assert_eq!(n, 0);
    assert!(err.unwrap().contains("401"));
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_node_cannot_trust_is_refused_with_the_fix_and_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = Ca::new(d, "good");
    let other = Ca::new(d, "other");
    let cases = [
        ("expired", good.issue(d, "expired", &["localhost"], (2001, 2002)), &good.pem, "validity period"),
        ("another CA's", other.issue(d, "foreign", &["localhost"], VALID), &good.pem, "controller.ca_file"),
        (
            "another name's",
            good.issue(d, "elsewhere", &["ctl.example"], VALID),
            &good.pem,
            "does not name this host",
        ),
    ];
    for (what, (cert, key), ca_file, fix) in cases {
        let store = d.join(format!("store-{what}"));
        let ctl = start(&store, Some(ServerTls { cert, key, client_ca: None }), None).await.unwrap();
        let url = format!("https://localhost:{}", ctl.addr.port());
        let spool = d.join(format!("node-{what}"));
        let cfg = forward_config(&spool, &url, |c| c.ca_file = Some(ca_file.clone()));
        let (n, err) = send(cfg, &[node_event("edge-1", 0)], 1, 1).await;
        let err = err.unwrap_or_default();
        assert_eq!(n, 0, "{what}");
        assert!(err.contains("TLS handshake") && err.contains(fix), "{what}: {err}");
        assert_eq!(std::fs::read_dir(spool.join("spool")).unwrap().count(), 1, "{what}: kept in the spool");
        ctl.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_requires_client_certificates_takes_only_its_cas() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "good");
    let clients = Ca::new(d, "clients");
    let (cert, key) = ca.issue(d, "server", &["localhost"], VALID);
    let (client_cert, client_key) = clients.issue(d, "edge-1", &["edge-1"], VALID);
    let tls = ServerTls { cert, key, client_ca: Some(clients.pem.clone()) };
    let ctl = start(&d.join("store"), Some(tls), None).await.unwrap();
    let url = format!("https://localhost:{}", ctl.addr.port());
    let (n, err) = send(
        forward_config(&d.join("a"), &url, |c| c.ca_file = Some(ca.pem.clone())),
        &[node_event("e", 0)],
        1,
        1,
    )
    .await;
    assert_eq!(n, 0);
    let err = err.unwrap_or_default();
    assert!(err.contains("client certificate it trusts") && err.contains("client_cert"), "{err}");
    let with_cert = |c: &mut ControllerConfig| {
        c.ca_file = Some(ca.pem.clone());
        c.client_cert = Some(client_cert.clone());
        c.client_key = Some(client_key.clone());
    };
    let (n, err) = send(forward_config(&d.join("a"), &url, with_cert), &[], 1, 1).await;
    assert_eq!((n, err), (1, None), "the spooled event, with a client certificate");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_controller_wants_tls_and_tokens_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let e = start_on(any, &d.join("s"), None, None).await.err().unwrap().to_string();
    assert!(e.contains("plain HTTP") && e.contains("--tls-cert"), "{e}");
    let ca = Ca::new(d, "good");
    let (cert, key) = ca.issue(d, "server", &["localhost"], VALID);
    let tls = ServerTls { cert: cert.clone(), key: key.clone(), client_ca: None };
    let e = start_on(any, &d.join("s"), Some(tls), None).await.err().unwrap().to_string();
    assert!(e.contains("--tokens"), "{e}");
    // A key that is not the certificate's.
    let (_, other_key) = ca.issue(d, "other", &["localhost"], VALID);
    let tls = ServerTls { cert, key: other_key, client_ca: None };
    let e = start(&d.join("s"), Some(tls), None).await.err().unwrap().to_string();
    assert!(e.contains("does the key belong to the certificate"), "{e}");
    // The node side: a CA file for plain http, a token file that is missing.
    let cfg = forward_config(d, "http://127.0.0.1:9", |c| c.ca_file = Some(ca.pem.clone()));
    let e = Forwarder::open(cfg).err().unwrap().to_string();
    assert!(e.contains("https://"), "{e}");
    let cfg = forward_config(d, "https://127.0.0.1:9", |c| c.token_file = Some(d.join("missing.token")));
    let e = Forwarder::open(cfg).err().unwrap().to_string();
    assert!(e.contains("missing.token") && e.contains("acpimon token add"), "{e}");
}

/// One byte a second, in the TLS handshake or in a request's body: cut, while a normal client
/// is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_one_byte_a_second_is_cut_without_holding_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "good");
    let (cert, key) = ca.issue(d, "server", &["localhost"], VALID);
    let tls = ServerTls { cert, key, client_ca: None };
    let ctl = start(&d.join("store"), Some(tls), None).await.unwrap();
    let plain = start(&d.join("store-plain"), None, None).await.unwrap();
    let trickle = |addr: SocketAddr, head: Vec<u8>| async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&head).await.unwrap();
        let mut answer = Vec::new();
        loop {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            assert!(start.elapsed() < Duration::from_secs(30), "still connected after 30 s");
        }
        (start.elapsed(), String::from_utf8_lossy(&answer).into_owned())
    };
    let handshake = tokio::spawn(trickle(ctl.addr, vec![0x16, 0x03, 0x01]));
    let body = tokio::spawn(trickle(
        plain.addr,
        b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{".to_vec(),
    ));
    // Meanwhile others are served promptly.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(get(ctl.addr, "/healthz", None, Some(&ca.pem)).await.0, 200);
        assert_eq!(get(plain.addr, "/healthz", None, None).await.0, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "a normal client waited {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (took, _) = handshake.await.unwrap();
    assert!(took < Duration::from_secs(15), "the handshake trickler was cut after {took:?}");
    let (took, answer) = body.await.unwrap();
    assert!(took < Duration::from_secs(15), "the body trickler was cut after {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    ctl.stop().await;
    plain.stop().await;
}

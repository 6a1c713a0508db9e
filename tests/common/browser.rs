//! A real browser for the controller's pages: Debian's headless Chromium, driven over the W3C
//! WebDriver protocol through `chromedriver` (plain JSON over HTTP, spoken here with std's
//! TcpStream). JavaScript is off: the pages must read without it. Screenshots are kept under
//! `target/test-artifacts/browser/`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one Chromium session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

/// One WebDriver request; (HTTP status, JSON body).
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map_or(String::new(), Value::to_string);
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("chromedriver at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // chromedriver may keep the connection open: read the head, then Content-Length bytes.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head_len, body_len) = loop {
        let n = s.read(&mut chunk).unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
        assert!(n > 0, "chromedriver closed without an answer to {method} {path}");
        raw.extend_from_slice(&chunk[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while raw.len() < head_len + body_len {
        let n = s.read(&mut chunk).unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
        assert!(n > 0, "chromedriver closed mid-answer to {method} {path}");
        raw.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&raw[..head_len]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, serde_json::from_slice(&raw[head_len..head_len + body_len]).unwrap_or(Value::Null))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium without JavaScript.
    pub fn start() -> Browser {
        super::require("chromedriver");
        super::require("chromium");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err()
            || call(addr, "GET", "/status", None).1["value"]["ready"] != true
        {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver is not ready after 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000"],
                "prefs": {"profile.managed_default_content_settings.javascript": 2}
            }
        }}});
        let (status, v) = call(addr, "POST", "/session", Some(&caps));
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session ({status}): {v}"))
            .to_string();
        let mut b = Browser { driver, addr, session };
        b.driver_alive();
        b
    }

    fn driver_alive(&mut self) {
        assert!(self.driver.try_wait().unwrap().is_none(), "chromedriver exited");
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{what}", self.session);
        let (status, v) = call(self.addr, method, &path, body.as_ref());
        assert_eq!(status, 200, "WebDriver {method} {what}: {v}");
        v["value"].clone()
    }

    pub fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    pub fn title(&self) -> String {
        self.cmd("GET", "/title", None).as_str().unwrap_or_default().to_string()
    }

    /// The first element matching a CSS selector, if any.
    pub fn find(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        let (status, v) =
            call(self.addr, "POST", &path, Some(&json!({"using": "css selector", "value": css})));
        (status == 200).then(|| v["value"][ELEMENT].as_str().map(str::to_string)).flatten()
    }

    pub fn text(&self, element: &str) -> String {
        self.cmd("GET", &format!("/element/{element}/text"), None).as_str().unwrap_or_default().to_string()
    }

    pub fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    /// The page's visible text.
    pub fn body_text(&self) -> String {
        self.find("body").map(|b| self.text(&b)).unwrap_or_default()
    }

    /// Saves a screenshot of the page as `NAME.png` under the artifacts directory; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = super::repo().join("target/test-artifacts/browser");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(self.addr, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What an operator does: opens the controller's fleet page, finds `vm` among the VMs in
/// trouble, opens its page and its latest incident, whose verdict must be `class`; each view
/// is checked and kept as a screenshot named `PREFIX-fleet`, `-vm`, `-incident`.
pub fn walk_to_the_incident(controller: SocketAddr, vm: &str, class: &str, prefix: &str) {
    let b = Browser::start();
    let base = format!("http://{controller}");
    b.open(&format!("{base}/"));
    assert!(b.title().contains("Fleet"), "{}", b.title());
    let fleet = b.body_text();
    assert!(fleet.contains(vm), "the fleet page shows no {vm}: {fleet}");
    b.screenshot(&format!("{prefix}-fleet"));
    let link =
        b.find("tr.trouble a.vm").unwrap_or_else(|| panic!("no VM in trouble on the fleet page: {fleet}"));
    assert_eq!(b.text(&link), vm);
    b.click(&link);
    assert!(b.url().contains("/vm/"), "{}", b.url());
    let page = b.body_text();
    assert!(page.contains("Heartbeat latency") && page.contains("Incidents"), "{page}");
    assert!(b.find("svg.latency circle").is_some(), "the latency chart has samples: {page}");
    b.screenshot(&format!("{prefix}-vm"));
    let incident = b.find("a.incident").unwrap_or_else(|| panic!("no incident on the VM's page: {page}"));
    b.click(&incident);
    let verdict = b.find("#verdict").map(|v| b.text(&v)).unwrap_or_default();
    assert!(verdict.contains(class), "the incident's verdict: {verdict}\n{}", b.body_text());
    let steps = b.find("#steps").map(|s| b.text(&s)).unwrap_or_default();
    assert!(steps.contains("sysrq") && steps.contains("ms"), "{steps}");
    assert!(b.find("#timeline").is_some());
    b.screenshot(&format!("{prefix}-incident"));
    // The filters: by state, and one that matches nothing.
    b.open(&format!("{base}/?state=unresponsive"));
    assert!(b.body_text().contains(vm));
    b.open(&format!("{base}/?state=gone"));
    assert!(b.body_text().contains("No VM matches"), "{}", b.body_text());
}

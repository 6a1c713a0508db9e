//! A responder under test, speaking the protocol over its stdin and stdout (`--port -` for
//! the binary, `PORT=-` for the shell example).

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use acpimon_responder::json::{self, Value};

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A private scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("acpimon-responder-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Responder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Vec<u8>>,
}

impl Responder {
    pub fn start(mut cmd: Command) -> Responder {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Responder { stdin: child.stdin.take(), child, lines: rx }
    }

    pub fn send(&mut self, line: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line).unwrap();
        stdin.flush().unwrap();
    }

    pub fn send_line(&mut self, line: &str) {
        self.send(format!("{line}\n").as_bytes());
    }

    /// The next line, raw, within `timeout`.
    pub fn raw(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The next line, which must be a protocol message.
    pub fn recv(&self, timeout: Duration) -> Value {
        let line = self.raw(timeout).unwrap_or_else(|| panic!("no line within {timeout:?}"));
        message(&line)
    }

    /// Nothing arrives within `d`.
    pub fn quiet(&self, d: Duration) {
        if let Some(l) = self.raw(d) {
            panic!("unexpected line {:?}", String::from_utf8_lossy(&l));
        }
    }

    /// Closes stdin; the responder must finish with status 0 after answering; returns the
    /// lines it still wrote.
    pub fn finish(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        while let Some(l) = self.raw(Duration::from_secs(20)) {
            rest.push(message(&l));
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the responder exited with {status}");
        rest
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks a line as the host would (UTF-8, one JSON object, `v` 1, a `type`, within 4096
/// bytes) and parses it.
pub fn message(line: &[u8]) -> Value {
    assert!(line.len() <= 4096, "a line of {} bytes", line.len());
    assert_eq!(line.last(), Some(&b'\n'), "{:?}", String::from_utf8_lossy(line));
    let text = std::str::from_utf8(&line[..line.len() - 1]).expect("UTF-8");
    let v = json::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(v.get("v").and_then(Value::as_u64), Some(1), "{text}");
    assert!(v.get("type").and_then(Value::as_str).is_some(), "{text}");
    v
}

pub fn kind(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

pub fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

pub fn audit_field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get("audit").and_then(|a| a.get(name))
}

/// The garbage a misbehaving peer might send: every line of it must be ignored.
pub fn junk() -> Vec<Vec<u8>> {
    let mut j: Vec<Vec<u8>> = (0..8).map(acpimon_responder::proto::garbage).collect();
    let mut huge = b"{\"v\":1,\"type\":\"challenge\",\"nonce\":\"".to_vec();
    huge.resize(100_000, b'a');
    huge.extend_from_slice(b"\"}\n");
    j.push(huge);
    for l in [
        "{}",
        "null",
        "{\"v\":1,\"type\":\"challenge\"}",
        "{\"v\":1,\"type\":\"challenge\",\"nonce\":42}",
        "{\"v\":1,\"type\":\"health\",\"id\":[1]}",
        "{\"v\":\"1\",\"type\":\"challenge\",\"nonce\":\"aa\"}",
        "{\"v\":10,\"type\":\"challenge\",\"nonce\":\"aa\"}",
        "{\"v\":1,\"type\":\"ack\",\"nonce\":\"aa\"}",
        "\"type\":\"challenge\",\"nonce\":\"aa\"",
        "{\"v\":1,\"type\":\"challenge\",\"nonce\":\"a\\\"b\\u0000\"",
    ] {
        j.push(format!("{l}\n").into_bytes());
    }
    j.push(b"\x00\x01\x02\xff\xfe\r\n".to_vec());
    j
}

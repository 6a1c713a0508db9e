//! The app protocol's messages (`docs/app-protocol.md`, section 2): parsing what the host
//! sends, formatting what the app sends.
//!
//! Every line the host sends is untrusted: anything that is not a version-1 object with a
//! `type` is an [`Ignored`] (the caller counts and logs it), unknown fields are skipped, and
//! what we echo back (`nonce`, `id`) is bounded. Every line we format ends with `\n` and stays
//! below the host's 4096-byte line limit whatever the details and audit output contain.

use std::fmt;

use crate::json::{self, push_str, push_str_bounded, truncate_utf8, Value};
use crate::status::Report;

/// The protocol version this responder speaks.
pub const VERSION: u64 = 1;
/// The host's line limit, `\n` included; longer lines we receive are dropped.
pub const MAX_LINE: usize = 4096;
/// Longest `nonce` or `id` we echo (the host sends 16 and 8 characters).
pub const MAX_ECHO: usize = 64;
/// Bytes of audit output sent (the host keeps 1024).
pub const MAX_OUTPUT: usize = 1024;
/// Budgets for the escaped forms of the free-text fields, so that a line always fits
/// [`MAX_LINE`] (a control character escapes to 6 bytes).
const DETAILS_BUDGET: usize = 1100;
const OUTPUT_BUDGET: usize = 1900;
const NAME_BUDGET: usize = 6 * MAX_ECHO;

/// A request from the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// "Are you alive?": answer with [`ack`].
    Challenge {
        /// The challenge's sequence number, echoed when present.
        seq: Option<u64>,
        /// The nonce to echo.
        nonce: String,
    },
    /// "How are you?": answer with [`health`], running `audit` first if named.
    Health {
        /// The request's id, echoed.
        id: Option<Id>,
        /// The audit to run, if any.
        audit: Option<String>,
    },
    /// The host's greeting when it connects (informational).
    Hello {
        /// The host's `version` field, if it is a string.
        version: Option<String>,
    },
    /// A well-formed message of a type this responder does not know (ignored).
    Other(String),
}

/// A `health` request's `id`, echoed exactly as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Id {
    /// A string id (what the host sends).
    Str(String),
    /// An integer id.
    Num(u64),
}

/// Why a line was ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Longer than [`MAX_LINE`].
    TooLong,
    /// Not UTF-8.
    NotUtf8,
    /// Not JSON.
    NotJson(json::ParseError),
    /// JSON, but not an object.
    NotObject,
    /// No integer `v`.
    NoVersion,
    /// A `v` other than [`VERSION`].
    Version(String),
    /// No string `type`.
    NoType,
    /// A field this responder needs has the wrong type or size.
    BadField(&'static str, &'static str),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ignored::TooLong => write!(f, "longer than {MAX_LINE} bytes"),
            Ignored::NotUtf8 => f.write_str("not UTF-8"),
            Ignored::NotJson(e) => write!(f, "not JSON ({e})"),
            Ignored::NotObject => f.write_str("not a JSON object"),
            Ignored::NoVersion => f.write_str("no integer \"v\""),
            Ignored::Version(v) => write!(f, "unsupported version {v}"),
            Ignored::NoType => f.write_str("no string \"type\""),
            Ignored::BadField(name, why) => write!(f, "field \"{name}\": {why}"),
        }
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is tolerated).
pub fn parse_request(line: &[u8]) -> Result<Request, Ignored> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() >= MAX_LINE {
        return Err(Ignored::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| Ignored::NotUtf8)?;
    let v = json::parse(text).map_err(Ignored::NotJson)?;
    if !matches!(v, Value::Object(_)) {
        return Err(Ignored::NotObject);
    }
    match v.get("v") {
        Some(n @ Value::Number(text)) => {
            if n.as_u64() != Some(VERSION) {
                return Err(Ignored::Version(truncate_utf8(text, 20).to_string()));
            }
        }
        _ => return Err(Ignored::NoVersion),
    }
    let kind = v.get("type").and_then(Value::as_str).ok_or(Ignored::NoType)?;
    match kind {
        "challenge" => {
            let nonce = echo_str(&v, "nonce")?.ok_or(Ignored::BadField("nonce", "missing"))?;
            let seq = match v.get("seq") {
                None | Some(Value::Null) => None,
                Some(s) => Some(s.as_u64().ok_or(Ignored::BadField("seq", "not a non-negative integer"))?),
            };
            Ok(Request::Challenge { seq, nonce })
        }
        "health" => {
            let id = match v.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::Number(_)) => Some(Id::Num(
                    v.get("id")
                        .and_then(Value::as_u64)
                        .ok_or(Ignored::BadField("id", "not a non-negative integer"))?,
                )),
                Some(_) => Some(Id::Str(echo_str(&v, "id")?.unwrap_or_default())),
            };
            let audit = match v.get("audit") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(Ignored::BadField("audit", "not a string or null")),
            };
            Ok(Request::Health { id, audit })
        }
        "hello" => {
            Ok(Request::Hello { version: v.get("version").and_then(Value::as_str).map(str::to_string) })
        }
        other => Ok(Request::Other(truncate_utf8(other, 64).to_string())),
    }
}

/// A string field we echo: absent is `None`, anything but a short string is an error.
fn echo_str(v: &Value, name: &'static str) -> Result<Option<String>, Ignored> {
    match v.get(name) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_ECHO => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(Ignored::BadField(name, "too long")),
        Some(_) => Err(Ignored::BadField(name, "not a string")),
    }
}

fn start(kind: &str) -> String {
    let mut out = String::with_capacity(128);
    out.push_str("{\"v\":1,\"type\":");
    push_str(&mut out, kind);
    out
}

fn field(out: &mut String, name: &str) {
    out.push(',');
    push_str(out, name);
    out.push(':');
}

fn end(mut out: String) -> String {
    out.push_str("}\n");
    out
}

/// `ack`: the answer to a challenge.
pub fn ack(seq: Option<u64>, nonce: &str) -> String {
    let mut out = start("ack");
    if let Some(seq) = seq {
        field(&mut out, "seq");
        out.push_str(&seq.to_string());
    }
    field(&mut out, "nonce");
    push_str_bounded(&mut out, nonce, NAME_BUDGET);
    end(out)
}

/// `hello`: the app's greeting.
pub fn hello(app: &str, version: &str) -> String {
    let mut out = start("hello");
    field(&mut out, "app");
    push_str_bounded(&mut out, app, 256);
    field(&mut out, "version");
    push_str_bounded(&mut out, version, 64);
    end(out)
}

/// The result of an audit, as sent in a `health` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditResult {
    /// The audit's name as requested.
    pub name: String,
    /// Exit status: 0 passed; 124 timed out; 127 not configured or not runnable; 128+N
    /// killed by signal N.
    pub exit: i32,
    /// What it printed (stdout and stderr merged), at most [`MAX_OUTPUT`] bytes.
    pub output: String,
}

/// `health`: the app's status, answering a request (`id`) or on its own (`id` = `None`).
pub fn health(id: Option<&Id>, report: &Report, audit: Option<&AuditResult>) -> String {
    let mut out = start("health");
    match id {
        Some(Id::Str(s)) => {
            field(&mut out, "id");
            push_str_bounded(&mut out, s, NAME_BUDGET);
        }
        Some(Id::Num(n)) => {
            field(&mut out, "id");
            out.push_str(&n.to_string());
        }
        None => {}
    }
    field(&mut out, "status");
    push_str(&mut out, report.status.as_str());
    if let Some(d) = &report.details {
        field(&mut out, "details");
        push_str_bounded(&mut out, d, DETAILS_BUDGET);
    }
    if let Some(a) = audit {
        field(&mut out, "audit");
        out.push_str("{\"name\":");
        push_str_bounded(&mut out, truncate_utf8(&a.name, MAX_ECHO), NAME_BUDGET);
        out.push_str(",\"exit\":");
        out.push_str(&a.exit.to_string());
        out.push_str(",\"output\":");
        push_str_bounded(&mut out, truncate_utf8(&a.output, MAX_OUTPUT), OUTPUT_BUDGET);
        out.push('}');
    }
    end(out)
}

/// Test mode (`--garbage N`): line number `i` of the garbage written before answering. The
/// kinds cycle: an oversized line (10 KiB), text that is not JSON, a wrong version, binary
/// bytes (invalid UTF-8, NULs, escapes), a JSON array, an object without `type`, wrong field
/// types, an unknown type. Every line ends with `\n` and has no other `\n`.
pub fn garbage(i: u64) -> Vec<u8> {
    let mut line = match i % 8 {
        0 => {
            let mut l = b"{\"v\":1,\"type\":\"health\",\"status\":\"ok\",\"details\":\"".to_vec();
            l.resize(10 * 1024 - 3, b'x');
            l.extend_from_slice(b"\"}");
            l
        }
        1 => format!("garbage line {i}: this is not JSON").into_bytes(),
        2 => format!("{{\"v\":2,\"type\":\"health\",\"status\":\"ok\",\"garbage\":{i}}}").into_bytes(),
        3 => {
            let mut l: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n').collect();
            l.extend_from_slice(&[0xff, 0xfe, 0xc0, 0x80, 0xed, 0xa0, 0x80, 0x00, 0x1b, b'[', b'2', b'J']);
            l
        }
        4 => format!("[1,2,3,{i}]").into_bytes(),
        5 => format!("{{\"v\":1,\"garbage\":{i}}}").into_bytes(),
        6 => b"{\"v\":\"1\",\"type\":7,\"status\":[]}".to_vec(),
        _ => format!("{{\"v\":1,\"type\":\"garbage\",\"n\":{i}}}").into_bytes(),
    };
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    fn parse_line(s: &str) -> Result<Request, Ignored> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn parses_the_documented_requests() {
        assert_eq!(
            parse_line(r#"{"v":1,"type":"challenge","seq":42,"nonce":"9f1c2a7e5b3d8c01"}"#),
            Ok(Request::Challenge { seq: Some(42), nonce: "9f1c2a7e5b3d8c01".into() })
        );
        assert_eq!(
            parse_line(r#"{"v":1,"type":"health","id":"c0ffee01","audit":"disk"}"#),
            Ok(Request::Health { id: Some(Id::Str("c0ffee01".into())), audit: Some("disk".into()) })
        );
        assert_eq!(
            parse_line(r#"{"v":1,"type":"health","id":"00000001","audit":null}"#),
            Ok(Request::Health { id: Some(Id::Str("00000001".into())), audit: None })
        );
        assert_eq!(
            parse_line(r#"{"v":1,"type":"hello","host":"acpimon","version":"0.1.0"}"#),
            Ok(Request::Hello { version: Some("0.1.0".into()) })
        );
    }

    #[test]
    fn tolerates_cr_spaces_unknown_fields_and_order() {
        assert_eq!(
            parse_line(
                "{ \"nonce\" : \"ab\" , \"later\" : {\"x\":[1]}, \"type\" : \"challenge\", \"v\" : 1 }\r"
            ),
            Ok(Request::Challenge { seq: None, nonce: "ab".into() })
        );
        assert_eq!(
            parse_line(r#"{"v":1,"type":"health","id":7}"#),
            Ok(Request::Health { id: Some(Id::Num(7)), audit: None })
        );
        assert_eq!(parse_line(r#"{"v":1,"type":"future"}"#), Ok(Request::Other("future".into())));
    }

    #[test]
    fn ignores_what_it_cannot_use() {
        type Case = (&'static [u8], fn(&Ignored) -> bool);
        let cases: &[Case] = &[
            (b"\xff\xfe", |e| *e == Ignored::NotUtf8),
            (b"hello there", |e| matches!(e, Ignored::NotJson(_))),
            (b"", |e| matches!(e, Ignored::NotJson(_))),
            (b"[1,2]", |e| *e == Ignored::NotObject),
            (b"{\"type\":\"challenge\"}", |e| *e == Ignored::NoVersion),
            (b"{\"v\":\"1\",\"type\":\"challenge\"}", |e| *e == Ignored::NoVersion),
            (b"{\"v\":2,\"type\":\"challenge\",\"nonce\":\"a\"}", |e| *e == Ignored::Version("2".into())),
            (b"{\"v\":1.0,\"type\":\"challenge\",\"nonce\":\"a\"}", |e| matches!(e, Ignored::Version(_))),
            (b"{\"v\":1}", |e| *e == Ignored::NoType),
            (b"{\"v\":1,\"type\":3}", |e| *e == Ignored::NoType),
            (b"{\"v\":1,\"type\":\"challenge\"}", |e| matches!(e, Ignored::BadField("nonce", _))),
            (b"{\"v\":1,\"type\":\"challenge\",\"nonce\":5}", |e| matches!(e, Ignored::BadField("nonce", _))),
            (b"{\"v\":1,\"type\":\"challenge\",\"nonce\":\"a\",\"seq\":-1}", |e| {
                matches!(e, Ignored::BadField("seq", _))
            }),
            (b"{\"v\":1,\"type\":\"health\",\"id\":[]}", |e| matches!(e, Ignored::BadField("id", _))),
            (b"{\"v\":1,\"type\":\"health\",\"audit\":1}", |e| matches!(e, Ignored::BadField("audit", _))),
        ];
        for (line, want) in cases {
            let got = parse_request(line).unwrap_err();
            assert!(want(&got), "{:?}: {got:?}", String::from_utf8_lossy(line));
            assert!(!got.to_string().is_empty());
        }
        let long_nonce = format!(r#"{{"v":1,"type":"challenge","nonce":"{}"}}"#, "a".repeat(MAX_ECHO + 1));
        assert_eq!(parse_line(&long_nonce), Err(Ignored::BadField("nonce", "too long")));
        let long = format!(r#"{{"v":1,"type":"hello","x":"{}"}}"#, "a".repeat(MAX_LINE));
        assert_eq!(parse_line(&long), Err(Ignored::TooLong));
    }

    /// Every line we format parses back (as JSON, with the fields the host reads).
    fn reparse(line: &str) -> Value {
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "{line:?}");
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        let v = json::parse(line.trim_end()).unwrap();
        assert_eq!(v.get("v").and_then(Value::as_u64), Some(1));
        v
    }

    #[test]
    fn formats_ack_and_hello() {
        assert_eq!(
            ack(Some(42), "9f1c2a7e5b3d8c01"),
            "{\"v\":1,\"type\":\"ack\",\"seq\":42,\"nonce\":\"9f1c2a7e5b3d8c01\"}\n"
        );
        assert_eq!(ack(None, "a\"b"), "{\"v\":1,\"type\":\"ack\",\"nonce\":\"a\\\"b\"}\n");
        assert_eq!(reparse(&ack(None, "a\"b")).get("nonce").and_then(Value::as_str), Some("a\"b"));
        assert_eq!(
            hello("web", "2.4.1"),
            "{\"v\":1,\"type\":\"hello\",\"app\":\"web\",\"version\":\"2.4.1\"}\n"
        );
        assert_eq!(reparse(&hello("a\u{1}", "1")).get("app").and_then(Value::as_str), Some("a\u{1}"));
    }

    #[test]
    fn formats_health() {
        assert_eq!(
            health(Some(&Id::Str("00000001".into())), &Report::ok(), None),
            "{\"v\":1,\"type\":\"health\",\"id\":\"00000001\",\"status\":\"ok\"}\n"
        );
        assert_eq!(
            health(None, &Report::new(Status::Degraded, "cache cold"), None),
            "{\"v\":1,\"type\":\"health\",\"status\":\"degraded\",\"details\":\"cache cold\"}\n"
        );
        let a = AuditResult { name: "disk".into(), exit: 1, output: "/dev/vda1 93%\n".into() };
        assert_eq!(
            health(Some(&Id::Num(3)), &Report::new(Status::Degraded, "disk 93% full"), Some(&a)),
            "{\"v\":1,\"type\":\"health\",\"id\":3,\"status\":\"degraded\",\"details\":\"disk 93% full\",\
             \"audit\":{\"name\":\"disk\",\"exit\":1,\"output\":\"/dev/vda1 93%\\n\"}}\n"
        );
    }

    #[test]
    fn the_worst_health_line_fits_the_host_limit() {
        let nasty: String = "\u{1}".repeat(5000);
        let report = Report::new(Status::Failed, &format!("x{nasty}"));
        let a = AuditResult { name: nasty.clone(), exit: -1, output: nasty.clone() };
        let line = health(Some(&Id::Str("\u{1}".repeat(MAX_ECHO))), &report, Some(&a));
        let v = reparse(&line);
        assert!(v.get("details").is_some() && v.get("audit").is_some());
        let plain = "o".repeat(5000);
        let a = AuditResult { name: "n".into(), exit: 0, output: plain.clone() };
        let v = reparse(&health(None, &Report::new(Status::Ok, &plain), Some(&a)));
        let out = v.get("audit").and_then(|a| a.get("output")).and_then(Value::as_str).unwrap();
        assert_eq!(out.len(), MAX_OUTPUT, "plain output is kept up to the host's 1024 bytes");
        assert_eq!(v.get("details").and_then(Value::as_str).unwrap().len(), crate::status::MAX_DETAILS);
    }

    #[test]
    fn garbage_is_what_it_says() {
        for i in 0..16 {
            let g = garbage(i);
            assert_eq!(g.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(g.last(), Some(&b'\n'));
            let line = &g[..g.len() - 1];
            match i % 8 {
                0 => {
                    assert_eq!(g.len(), 10 * 1024);
                    assert_eq!(parse_request(line), Err(Ignored::TooLong));
                }
                7 => assert!(matches!(parse_request(line), Ok(Request::Other(_)))),
                _ => assert!(parse_request(line).is_err(), "{i}: {:?}", String::from_utf8_lossy(line)),
            }
        }
    }
}

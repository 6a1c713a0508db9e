//! A small JSON reader and writer, enough for the app protocol's one-line objects.
//!
//! The reader parses RFC 8259 JSON into a [`Value`] tree. Its input is untrusted (it comes
//! from the host, or from whatever sits on the other end of the port): nesting is limited to
//! [`MAX_DEPTH`], and callers bound the input's length (a protocol line is at most 4096
//! bytes). Numbers are kept as their validated text, so integers of any size are exact.
//!
//! The writer escapes strings ([`push_str`]) and can cut them so that the escaped form stays
//! within a byte budget ([`push_str_bounded`]): a line we send must fit the host's 4096-byte
//! limit even when a command's output is full of control characters.

use std::fmt;

/// Deepest nesting of arrays and objects the reader accepts.
pub const MAX_DEPTH: usize = 16;

/// A parsed JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number, as its (validated) source text.
    Number(String),
    /// A string, unescaped.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object's members in source order (duplicates kept; [`Value::get`] finds the last).
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object (the last one if the key repeats, as serde_json does).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number as a `u64`, if it is a non-negative integer written without fraction or
    /// exponent that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.parse().ok(),
            _ => None,
        }
    }
}

/// Why a text is not JSON: what was wrong and at which byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// What was wrong.
    pub what: &'static str,
    /// Byte offset in the input.
    pub at: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for ParseError {}

/// Parses `text` as one JSON value; whitespace around it is allowed, anything else is not.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    let mut p = Parser { b: text.as_bytes(), i: 0 };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.b.len() {
        return Err(p.err("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &'static str) -> ParseError {
        ParseError { what, at: self.i }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8, what: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn literal(&mut self, word: &'static str, v: Value) -> Result<Value, ParseError> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        match self.peek() {
            None => Err(self.err("unexpected end")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.i += 1; // '{'
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a member name"));
            }
            let key = self.string()?;
            self.ws();
            self.eat(b':', "expected ':'")?;
            self.ws();
            let v = self.value(depth)?;
            members.push((key, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.i += 1; // '['
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        // Only ASCII was consumed, so this slice is valid UTF-8.
        Ok(Value::Number(String::from_utf8_lossy(&self.b[start..self.i]).into_owned()))
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let h = self.b.get(self.i..self.i + 4).ok_or_else(|| self.err("short \\u escape"))?;
        let mut v = 0;
        for &c in h {
            let d = (c as char).to_digit(16).ok_or_else(|| self.err("invalid \\u escape"))?;
            v = v * 16 + d;
        }
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.i += 1; // '"'
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unterminated string")) };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else { return Err(self.err("unterminated string")) };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(self.err("invalid escape")),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0..=0x1f => return Err(self.err("control character in string")),
                _ => out.push(c),
            }
        }
        // The input is a &str and escapes produce whole chars, so this cannot fail; stay safe.
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"))
    }

    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let hi = self.hex4()?;
        let code = match hi {
            0xd800..=0xdbff => {
                if !self.b[self.i..].starts_with(b"\\u") {
                    return Err(self.err("lone surrogate"));
                }
                self.i += 2;
                let lo = self.hex4()?;
                if !(0xdc00..=0xdfff).contains(&lo) {
                    return Err(self.err("lone surrogate"));
                }
                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
            }
            0xdc00..=0xdfff => return Err(self.err("lone surrogate")),
            c => c,
        };
        char::from_u32(code).ok_or_else(|| self.err("invalid \\u escape"))
    }
}

/// The escaped form of `c` inside a JSON string.
fn escape(c: char, buf: &mut [u8; 8]) -> &str {
    let simple = match c {
        '"' => Some("\\\""),
        '\\' => Some("\\\\"),
        '\n' => Some("\\n"),
        '\r' => Some("\\r"),
        '\t' => Some("\\t"),
        _ => None,
    };
    if let Some(s) = simple {
        return s;
    }
    if (c as u32) < 0x20 || c == '\u{7f}' {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = c as usize;
        *buf = [b'\\', b'u', b'0', b'0', HEX[n >> 4], HEX[n & 15], 0, 0];
        // Only ASCII bytes were written.
        return std::str::from_utf8(&buf[..6]).unwrap_or("?");
    }
    c.encode_utf8(&mut buf[..4])
}

/// Appends `s` as a quoted JSON string.
pub fn push_str(out: &mut String, s: &str) {
    push_str_bounded(out, s, usize::MAX);
}

/// Appends `s` as a quoted JSON string of at most `max` bytes between the quotes, cutting at
/// a character boundary; returns whether all of `s` fitted.
pub fn push_str_bounded(out: &mut String, s: &str, max: usize) -> bool {
    out.push('"');
    let mut used = 0usize;
    let mut whole = true;
    let mut buf = [0u8; 8];
    for c in s.chars() {
        let e = escape(c, &mut buf);
        if used + e.len() > max {
            whole = false;
            break;
        }
        used += e.len();
        out.push_str(e);
    }
    out.push('"');
    whole
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    #[test]
    fn parses_a_challenge() {
        let v = parse(r#"{"v":1,"type":"challenge","seq":42,"nonce":"9f1c2a7e5b3d8c01"}"#).unwrap();
        assert_eq!(v.get("v").and_then(Value::as_u64), Some(1));
        assert_eq!(v.get("type").and_then(Value::as_str), Some("challenge"));
        assert_eq!(v.get("seq").and_then(Value::as_u64), Some(42));
        assert_eq!(v.get("nonce"), Some(&s("9f1c2a7e5b3d8c01")));
        assert_eq!(v.get("missing"), None);
    }

    #[test]
    fn parses_every_kind_of_value() {
        let v = parse(" { \"a\" : [ 1 , -2.5e+3 , 0 , true , false , null , {} , [ ] ] , \"b\" : \"x\" } ")
            .unwrap();
        let Value::Array(items) = v.get("a").unwrap() else { panic!() };
        assert_eq!(
            items,
            &vec![
                Value::Number("1".into()),
                Value::Number("-2.5e+3".into()),
                Value::Number("0".into()),
                Value::Bool(true),
                Value::Bool(false),
                Value::Null,
                Value::Object(vec![]),
                Value::Array(vec![]),
            ]
        );
        assert_eq!(v.get("b"), Some(&s("x")));
    }

    #[test]
    fn unescapes_strings() {
        assert_eq!(parse(r#""a\"b\\c\/d\n\t\r\b\f""#).unwrap(), s("a\"b\\c/d\n\t\r\u{8}\u{c}"));
        assert_eq!(parse(r#""\u00e9\u20ac""#).unwrap(), s("é€"));
        assert_eq!(parse(r#""\ud83d\ude00""#).unwrap(), s("😀"));
        assert_eq!(parse("\"é😀\"").unwrap(), s("é😀"));
    }

    #[test]
    fn later_duplicate_keys_win() {
        let v = parse(r#"{"type":"a","type":"b"}"#).unwrap();
        assert_eq!(v.get("type"), Some(&s("b")));
    }

    #[test]
    fn rejects_what_is_not_json() {
        for bad in [
            "",
            "{",
            "}",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "[1,]",
            "{'a':1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":\"\\ud800\\u0041\"}",
            "\"tab\there\"",
            "{\"a\":1} x",
            "{\"a\":1}{}",
            "nul",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn limits_nesting() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(parse(&deep).unwrap_err().what, "nested too deeply");
        // Far too deep must fail cleanly, not overflow the stack.
        assert!(parse(&"[{\"a\":".repeat(100_000)).is_err());
    }

    #[test]
    fn numbers_convert_only_when_exact() {
        let n = |t: &str| Value::Number(t.into()).as_u64();
        assert_eq!(n("0"), Some(0));
        assert_eq!(n("18446744073709551615"), Some(u64::MAX));
        assert_eq!(n("18446744073709551616"), None);
        assert_eq!(n("-1"), None);
        assert_eq!(n("1.0"), None);
        assert_eq!(n("1e3"), None);
        assert_eq!(s("1").as_u64(), None);
    }

    #[test]
    fn writes_escaped_strings() {
        let mut out = String::new();
        push_str(&mut out, "a\"b\\c\nd\te\r\u{1}\u{1f}\u{7f}é");
        assert_eq!(out, r#""a\"b\\c\nd\te\r\u0001\u001f\u007fé""#);
        assert_eq!(parse(&out).unwrap(), s("a\"b\\c\nd\te\r\u{1}\u{1f}\u{7f}é"));
    }

    #[test]
    fn bounded_strings_cut_at_a_character() {
        let mut out = String::new();
        assert!(!push_str_bounded(&mut out, "ab\u{1}cd", 7));
        assert_eq!(out, r#""ab""#, "the 6-byte escape does not fit after 2 bytes");
        let mut out = String::new();
        assert!(!push_str_bounded(&mut out, "éé", 3));
        assert_eq!(out, "\"é\"");
        let mut out = String::new();
        assert!(push_str_bounded(&mut out, "abc", 3));
        assert_eq!(out, "\"abc\"");
    }

    #[test]
    fn truncates_at_a_character_boundary() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}

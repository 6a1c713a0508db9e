//! Who may talk to the controller: bearer tokens, one per node (and per operator), kept in a
//! token file as SHA-256 hashes only, so a copy of the file grants nothing.
//!
//! A `node` token may post events whose `node` is its name, and nothing else; an `operator`
//! token may read (`GET /v1/events`, `/v1/stats`). `acpimon token add NAME` makes a token,
//! prints it once and stores its hash; `list` and `remove` manage the file. The controller
//! reads the file again when it changes, so tokens are added and revoked without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::lock;

/// The largest token file read.
const MAX_FILE: usize = 4 << 20;

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Posts events for the node of its name.
    Node,
    /// Reads what the controller stored.
    Operator,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
        }
    }
}

/// One token's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The node's name (events it posts must carry it) or the operator's.
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// When it was made (RFC 3339).
    pub created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}; create it with `acpimon token add NAME --tokens {path}`")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the token file {path} is not valid: {reason}; fix it, or remove it and add the tokens again")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the token file {path}: {source}; check that its directory is writable")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
}

/// Hex SHA-256 of `token`.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token: 32 bytes from the OS's generator, hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal without an early exit; both sides are hashes, so only their length is public.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn load(path: &Path) -> Result<Vec<TokenEntry>, AuthError> {
    let bytes = match crate::util::fs::read_capped(path, MAX_FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AuthError::Read { path: path.into(), source }),
    };
    let invalid = |reason: String| AuthError::Invalid { path: path.into(), reason };
    let text = String::from_utf8(bytes).map_err(|_| invalid("it is not UTF-8".into()))?;
    let file: TokenFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    for t in &file.token {
        if !valid_name(&t.name) {
            return Err(invalid(format!("name '{}' is not 1-64 characters of [0-9A-Za-z._-]", t.name)));
        }
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("{}'s sha256 is not 64 hex digits", t.name)));
        }
    }
    Ok(file.token)
}

fn save(path: &Path, tokens: Vec<TokenEntry>) -> Result<(), AuthError> {
    let text = toml::to_string(&TokenFile { token: tokens })
        .map_err(|e| AuthError::Invalid { path: path.into(), reason: e.to_string() })?;
    let text = format!(
        "# acpimon controller tokens (`acpimon token add|list|remove`): the SHA-256 of each token, never the token.\n{text}"
    );
    crate::util::fs::replace(path, text.as_bytes(), 0o600)
        .map_err(|source| AuthError::Write { path: path.into(), source })
}

/// Adds a token for `name`, returning the token (shown once; only its hash is kept).
pub fn add(path: &Path, name: &str, role: Role) -> Result<String, AuthError> {
    if !valid_name(name) {
        return Err(AuthError::Usage(format!(
            "'{name}' is not 1-64 characters of [0-9A-Za-z._-]; use the node's name as acpimon watch's `node` setting gives it"
        )));
    }
    let mut tokens = load(path)?;
    if tokens.iter().any(|t| t.name == name && t.role == role) {
        return Err(AuthError::Usage(format!(
            "{name} already has a {} token; remove it first (`acpimon token remove {name}`) to replace it",
            role.name()
        )));
    }
    let token = new_token();
    tokens.push(TokenEntry {
        name: name.into(),
        role,
        sha256: hash(&token),
        created: crate::units::now_rfc3339(),
    });
    save(path, tokens)?;
    Ok(token)
}

/// Removes `name`'s tokens; how many there were.
pub fn remove(path: &Path, name: &str) -> Result<usize, AuthError> {
    let mut tokens = load(path)?;
    let before = tokens.len();
    tokens.retain(|t| t.name != name);
    let removed = before - tokens.len();
    if removed == 0 {
        return Err(AuthError::Usage(format!(
            "{} has no token for '{name}'; `acpimon token list` shows them",
            path.display()
        )));
    }
    save(path, tokens)?;
    Ok(removed)
}

/// The entries, for `acpimon token list`.
pub fn list(path: &Path) -> Result<Vec<TokenEntry>, AuthError> {
    load(path)
}

/// `acpimon token ...`: what it prints goes to stdout.
pub fn run(action: crate::cli::TokenAction) -> Result<(), AuthError> {
    use crate::cli::TokenAction;
    match action {
        TokenAction::Add { name, role, tokens } => {
            let token = add(&tokens, &name, role)?;
            println!("{token}");
            eprintln!(
                "acpimon token: a {} token for {name} is in {} (its hash only); this is the one time it is shown: \
                 put it in the node's controller.token_file",
                role.name(),
                tokens.display()
            );
        }
        TokenAction::List { tokens } => {
            for t in list(&tokens)? {
                println!("{:<24} {:<9} {}", t.name, t.role.name(), t.created);
            }
        }
        TokenAction::Remove { name, tokens } => {
            let n = remove(&tokens, &name)?;
            eprintln!("acpimon token: removed {n} token(s) of {name}");
        }
    }
    Ok(())
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one the file does not hold: 401.
    Unauthorized(String),
    /// A valid token for something else: 403.
    Forbidden(String),
}

/// The token file as the controller reads it: loaded at start, read again when its
/// modification time or size changes. A file that became invalid keeps the last good tokens
/// (and is logged), so a half-edited file locks nobody out.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    cache: Mutex<(Option<Stamp>, Arc<Vec<TokenEntry>>)>,
}

impl Tokens {
    pub fn open(path: &Path) -> Result<Tokens, AuthError> {
        let stamp = stamp(path);
        let entries = load(path)?;
        Ok(Tokens { path: path.into(), cache: Mutex::new((stamp, Arc::new(entries))) })
    }

    fn entries(&self) -> Arc<Vec<TokenEntry>> {
        let now = stamp(&self.path);
        let mut cache = lock(&self.cache);
        if now != cache.0 {
            match load(&self.path) {
                Ok(entries) => *cache = (now, Arc::new(entries)),
                Err(e) => {
                    tracing::error!(error = %e, "controller: keeping the previous tokens");
                    cache.0 = now;
                }
            }
        }
        cache.1.clone()
    }

    /// The entry of the bearer token in `authorization` (the header's value), if it is one
    /// of `role`.
    pub fn check(&self, authorization: Option<&str>, role: Role) -> Result<TokenEntry, Refusal> {
        let token = authorization.and_then(presented).filter(|t| !t.is_empty()).ok_or_else(|| {
            Refusal::Unauthorized("no bearer token: send Authorization: Bearer TOKEN".into())
        })?;
        let h = hash(&token);
        let entries = self.entries();
        let entry = entries.iter().find(|t| same(&t.sha256, &h)).ok_or_else(|| {
            Refusal::Unauthorized("the bearer token is not one this controller issued".into())
        })?;
        if entry.role != role {
            return Err(Refusal::Forbidden(format!(
                "{}'s token is a {} token; this needs a {} token",
                entry.name,
                entry.role.name(),
                role.name()
            )));
        }
        Ok(entry.clone())
    }
}

/// The token in an `Authorization` header: `Bearer TOKEN`, or HTTP Basic with the token as the
/// password (what a browser sends for the operator's pages; the user name is ignored).
fn presented(header: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, value) = header.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return Some(text.split_once(':')?.1.to_string());
    }
    None
}

/// A file's modification time and size: read again when either changes.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_checked_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let node = add(&path, "edge-1", Role::Node).unwrap();
        let op = add(&path, "alice", Role::Operator).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&node) && text.contains(&hash(&node)), "{text}");
        let tokens = Tokens::open(&path).unwrap();
        assert_eq!(tokens.check(Some(&format!("Bearer {node}")), Role::Node).unwrap().name, "edge-1");
        assert!(matches!(
            tokens.check(Some(&format!("Bearer {op}")), Role::Node),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(tokens.check(Some("Bearer nope"), Role::Node), Err(Refusal::Unauthorized(_))));
        assert!(matches!(tokens.check(None, Role::Node), Err(Refusal::Unauthorized(_))));
        assert!(matches!(tokens.check(Some(&node), Role::Node), Err(Refusal::Unauthorized(_))), "no Bearer");
        // A browser's Basic credentials, the token as the password.
        use base64::Engine;
        let basic =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("anyone:{op}")));
        assert_eq!(tokens.check(Some(&basic), Role::Operator).unwrap().name, "alice");
        assert!(matches!(tokens.check(Some("Basic !!"), Role::Operator), Err(Refusal::Unauthorized(_))));
        assert!(add(&path, "edge-1", Role::Node).unwrap_err().to_string().contains("already has"));
        assert!(add(&path, "a b", Role::Node).is_err());
        // Revoked without a restart: the file changed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(remove(&path, "edge-1").unwrap(), 1);
        assert!(matches!(
            tokens.check(Some(&format!("Bearer {node}")), Role::Node),
            Err(Refusal::Unauthorized(_))
        ));
        assert_eq!(list(&path).unwrap().len(), 1);
        // A broken file keeps the last good tokens.
        std::fs::write(&path, "token = 3").unwrap();
        assert_eq!(tokens.check(Some(&format!("Bearer {op}")), Role::Operator).unwrap().name, "alice");
        assert!(Tokens::open(&path).unwrap_err().to_string().contains("not valid"));
    }
}

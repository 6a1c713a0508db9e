//! TLS for the link between a node and its controller (rustls with the ring provider, no C
//! library): the forwarder's client configuration (the system's roots or a CA file, an
//! optional client certificate) and the controller's server configuration (a certificate and
//! key, optionally requiring client certificates from a CA). Every error names the file and
//! what to give instead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}; give a readable PEM file")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate ({what}); give a file with -----BEGIN CERTIFICATE----- blocks")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{path} holds no PEM private key; give the key of the certificate (PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey { path: PathBuf },
    #[error(
        "the system has no usable CA certificates ({0}); install Debian's ca-certificates or give a CA file"
    )]
    NoSystemRoots(String),
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error("client certificate verification cannot use {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
pub fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read { what, path: path.into(), source };
    let bytes = std::fs::read(path).map_err(read)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what, path: path.into() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoKey { path: path.into() })
}

fn roots_from(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(path, what)?);
    if added == 0 {
        return Err(TlsError::NoCertificate { what, path: path.into() });
    }
    Ok(roots)
}

/// Where a client's trust and identity come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key, for a controller that requires one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The rustls configuration: the CA file's certificates, else the system's
    /// (`/etc/ssl/certs` and the like, as `rustls-native-certs` finds them).
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match &self.ca_file {
            Some(path) => roots_from(path, "CA file")?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found.errors.first().map_or("none found".to_string(), ToString::to_string);
                    return Err(TlsError::NoSystemRoots(why));
                }
                roots
            }
        };
        let rustls = |what: String| move |source| TlsError::Rustls { what, source };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls("TLS versions".into()))?
            .with_root_certificates(roots);
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(cert, "client certificate")?, private_key(key)?)
                .map_err(rustls(format!(
                    "client certificate {} with key {}",
                    cert.display(),
                    key.display()
                )))?,
        };
        Ok(Arc::new(config))
    }
}

/// A server's certificate chain and key, and optionally the CA its clients' certificates must
/// chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let rustls = |what: String| move |source| TlsError::Rustls { what, source };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls("TLS versions".into()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots_from(path, "client CA file")?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::ClientCa { path: path.clone(), reason: e.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certificates(&self.cert, "certificate")?, private_key(&self.key)?)
            .map_err(rustls(format!(
                "certificate {} with key {} (does the key belong to the certificate?)",
                self.cert.display(),
                self.key.display()
            )))?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_pem_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e =
            ClientTls { ca_file: Some(junk.clone()), client_cert: None }.config().unwrap_err().to_string();
        assert!(e.contains("junk.pem") && e.contains("BEGIN CERTIFICATE"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = ServerTls { cert: missing, key: junk, client_ca: None }.config().unwrap_err().to_string();
        assert!(e.contains("cannot read certificate") && e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn the_system_roots_load_here() {
        // tools/setup's machines have Debian's ca-certificates.
        ClientTls::default().config().expect("system roots");
    }
}

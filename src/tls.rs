//! TLS for the PostgreSQL connections walcast opens itself (source and analytics), with
//! libpq's `sslmode` semantics, on rustls.
//!
//! | `sslmode` | encrypts | checks the chain | checks the host name |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (the default) | when the server offers it | no | no |
//! | `require` | yes | no | no |
//! | `verify-ca` | yes | against `sslrootcert` | no |
//! | `verify-full` | yes | against `sslrootcert` | yes |
//!
//! Without `sslrootcert` (or with `sslrootcert=system`) the chain is checked against the
//! Mozilla roots, as the replication connection (pgwire-replication) does. `sslcert` and
//! `sslkey` give a client certificate.
//!
//! The verifier for `prefer`/`require` (no check) and `verify-ca` (the chain, not the
//! name) is written here: rustls verifies chain and name together by default, and no crate
//! offers libpq's modes for tokio-postgres; tokio-postgres-rustls only carries a rustls
//! configuration into tokio-postgres.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn verifies_chain(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// How one PostgreSQL connection uses TLS: libpq's `sslmode`, `sslrootcert`, `sslcert`
/// and `sslkey`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// `None`: the Mozilla roots.
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The crypto provider of every rustls configuration in the process (ring, which the
/// replication client and reqwest also use), installed as the process default so that
/// libraries building their own configuration find it.
pub fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .expect("installed above")
}

/// The certificates of a PEM file; `what` names it for the error.
pub fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read the private key sslkey={} (PEM, PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

fn roots(root_cert: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let (added, _) = roots.add_parsable_certificates(certificates(path, "sslrootcert")?);
            if added == 0 {
                return Err(format!(
                    "sslrootcert={} holds no usable CA certificate",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

impl PgTls {
    /// The rustls configuration for this mode, reading the files now (so a missing or
    /// unreadable one is a configuration error at start). `None` for `disable`.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, String> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = provider();
        let roots = Arc::new(roots(self.root_cert.as_deref())?);
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match self.mode {
            SslMode::VerifyFull => builder.with_root_certificates(roots),
            mode => {
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| e.to_string())?;
                let verifier = Lenient {
                    inner,
                    check_chain: mode == SslMode::VerifyCa,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
            }
        };
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert, "sslcert")?, private_key(key)?)
                .map_err(|e| format!("sslcert and sslkey do not make a client certificate: {e}"))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("sslcert and sslkey go together: set both or neither".to_owned()),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// What libpq checks short of `verify-full`: for `verify-ca`, that the chain leads to a
/// trusted root and is valid now, not the name; for `prefer` and `require`, nothing (the
/// server is not authenticated). Either way the handshake's signatures are checked, so the
/// session is with whoever holds the certificate's key.
#[derive(Debug)]
struct Lenient {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Which server a TLS failure was with, for what to change.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// A PostgreSQL server, named by the setting of its URL.
    Postgres(&'a str),
    Redis,
}

/// What to change when a TLS handshake failed, from the error's text: which check did not
/// pass and which setting decides it. Empty when the text is not a certificate failure.
pub fn hint(error: &str, peer: Peer<'_>) -> String {
    let has = |needle: &str| error.contains(needle);
    let (ca, url, name_fix) = match peer {
        Peer::Postgres(setting) => (
            format!("sslrootcert in {setting}"),
            setting.to_owned(),
            ", or use sslmode=verify-ca to check the CA only",
        ),
        Peer::Redis => (
            "WALCAST_REDIS_CA_FILE".to_owned(),
            "WALCAST_REDIS_URL".to_owned(),
            "",
        ),
    };
    if has("UnknownIssuer") || has("unknown issuer") || has("BadSignature") {
        format!(
            "; the server's certificate is not signed by a CA walcast trusts: set {ca} to the \
             CA certificate that signed it (PEM)"
        )
    } else if has("NotValidForName") || has("not valid for name") {
        format!(
            "; the server's certificate is not issued for the host name in {url}: connect by a \
             name the certificate lists{name_fix}"
        )
    } else if has("Expired") || has("expired") || has("NotValidYet") || has("not valid yet") {
        "; the server's certificate is expired or not yet valid (or this machine's clock is \
         wrong): renew it on the server"
            .to_owned()
    } else {
        String::new()
    }
}

/// Whether an error's text is a certificate that did not verify: retrying will not help.
pub fn is_certificate_failure(error: &str) -> bool {
    error.contains("invalid peer certificate")
}

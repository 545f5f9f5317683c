//! TLS on both sides of the proxy (rustls with the ring provider): the listeners can terminate TLS
//! (optionally asking for client certificates, whose subjects become Kafka principals), and the proxy
//! can reach brokers over TLS (CA bundle or the system roots, host names verified, an optional client
//! certificate, SNI sent).
//!
//! Settings are paths and choices ([`ListenTls`], [`UpstreamTls`]); [`server_config`] and
//! [`client_config`] turn them into rustls configurations, reading and checking every file. The config
//! parser calls them once to report every problem by key path, and the proxy calls them again at start.

pub mod live;
pub mod principal;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Whether the listeners ask for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// Asked for; a client without one is served (it has no certificate principal), a client with one
    /// that does not verify against the CA is refused.
    Requested,
    /// A verified client certificate is required.
    Required,
}

/// `listen.tls`: clients connect to every listener with TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenTls {
    /// PEM: the proxy's certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    pub client_auth: ClientAuth,
    /// PEM: the CAs client certificates are verified against (required unless `client_auth: none`).
    pub client_ca_file: Option<PathBuf>,
    /// Kafka's `ssl.principal.mapping.rules`, in order (see [`principal`]).
    pub principal_rules: Vec<principal::Rule>,
    /// How long a client has to finish its handshake.
    pub handshake_timeout: Duration,
}

/// `upstream.tls`: the proxy reaches brokers with TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM: the CAs broker certificates are verified against; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Verify that the broker's certificate names the host the proxy connects to (on by default).
    pub verify_hostname: bool,
    /// PEM: a client certificate and key for brokers that require mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A TLS setting that cannot be used: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProblem {
    pub key: &'static str,
    pub message: String,
}

fn problem(key: &'static str, message: impl Into<String>) -> TlsProblem {
    TlsProblem {
        key,
        message: message.into(),
    }
}

/// The most a certificate, key or CA file may hold (a CA bundle of a few hundred certificates).
const MAX_PEM_FILE_BYTES: u64 = 4 << 20;

/// A PEM file's bytes: only a regular file of at most [`MAX_PEM_FILE_BYTES`] (a path naming a device or
/// a pipe must not hang the proxy's start).
fn read_pem_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsProblem> {
    crate::config::reader::read_bounded(path, MAX_PEM_FILE_BYTES)
        .map_err(|e| problem(key, format!("{}: {e}", path.display())))
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let pem = read_pem_file(key, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| problem(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(problem(
            key,
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsProblem> {
    let pem = read_pem_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| problem(key, format!("{}: {e}", path.display())))
}

fn roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsProblem> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(key, path)? {
        store
            .add(cert)
            .map_err(|e| problem(key, format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listeners' TLS configuration: TLS 1.2 and 1.3 with rustls' default (modern, AEAD-only) cipher
/// suites; client certificates as `client_auth` says.
pub fn server_config(tls: &ListenTls) -> Result<Arc<ServerConfig>, Vec<TlsProblem>> {
    let mut problems = Vec::new();
    let certs = read_certs("cert_file", &tls.cert_file).map_err(|p| problems.push(p));
    let key = read_key("key_file", &tls.key_file).map_err(|p| problems.push(p));
    let verifier = match (tls.client_auth, &tls.client_ca_file) {
        (ClientAuth::None, _) => None,
        (_, None) => {
            problems.push(problem(
                "client_ca_file",
                "needed to verify client certificates (client_auth is not none)",
            ));
            None
        }
        (auth, Some(path)) => match roots("client_ca_file", path) {
            Ok(store) => {
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider());
                let builder = if auth == ClientAuth::Requested {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                match builder.build() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(problem("client_ca_file", e.to_string()));
                        None
                    }
                }
            }
            Err(p) => {
                problems.push(p);
                None
            }
        },
    };
    let (Ok(certs), Ok(key)) = (certs, key) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![problem("cert_file", e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    // with_single_cert checks that the key matches the certificate.
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| vec![problem("key_file", format!("does not fit cert_file: {e}"))])?;
    Ok(Arc::new(config))
}

/// The configuration the proxy reaches brokers with.
pub fn client_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, Vec<TlsProblem>> {
    let mut problems = Vec::new();
    let store = match &tls.ca_file {
        Some(path) => roots("ca_file", path).map_err(|p| problems.push(p)).ok(),
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                problems.push(problem(
                    "ca_file",
                    "no CA file given and no system CA certificates found",
                ));
            }
            Some(store)
        }
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let certs = read_certs("cert_file", c).map_err(|p| problems.push(p));
            let key = read_key("key_file", k).map_err(|p| problems.push(p));
            match (certs, key) {
                (Ok(c), Ok(k)) => Some((c, k)),
                _ => None,
            }
        }
        (Some(_), None) => {
            problems.push(problem("key_file", "needed with cert_file"));
            None
        }
        (None, Some(_)) => {
            problems.push(problem("cert_file", "needed with key_file"));
            None
        }
    };
    let Some(store) = store.filter(|_| problems.is_empty()) else {
        return Err(problems);
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![problem("ca_file", e.to_string())])?;
    let builder = if tls.verify_hostname {
        builder.with_root_certificates(store)
    } else {
        let any_name =
            verify::AnyName::new(store).map_err(|e| vec![problem("ca_file", e.to_string())])?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(any_name))
    };
    let mut config = match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| vec![problem("key_file", format!("does not fit cert_file: {e}"))])?,
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = true;
    Ok(Arc::new(config))
}

/// Broker certificates verified against the CAs without checking the host name
/// (`upstream.tls.verify_hostname: false`, for brokers whose certificates name other hosts).
mod verify {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct AnyName {
        inner: Arc<WebPkiServerVerifier>,
    }

    impl AnyName {
        pub fn new(roots: RootCertStore) -> Result<Self, rustls::server::VerifierBuilderError> {
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider())
                    .build()?;
            Ok(AnyName { inner })
        }
    }

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                // The chain, validity and usage were checked; only the name is let go.
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }
}

pub mod stream;
pub use stream::Stream;

/// Every certificate file the settings name, with what it is for (the `file` label of the expiry
/// gauge): `listen`, `listen_client_ca`, `upstream_ca`, `upstream_client`.
pub fn certificate_files<'a>(
    listen: Option<&'a ListenTls>,
    upstream: Option<&'a UpstreamTls>,
    operator: Option<&'a ListenTls>,
) -> Vec<(&'static str, &'a Path)> {
    let mut out = Vec::new();
    if let Some(l) = listen {
        out.push(("listen", l.cert_file.as_path()));
        if let Some(ca) = &l.client_ca_file {
            out.push(("listen_client_ca", ca.as_path()));
        }
    }
    if let Some(u) = upstream {
        if let Some(ca) = &u.ca_file {
            out.push(("upstream_ca", ca.as_path()));
        }
        if let Some(c) = &u.cert_file {
            out.push(("upstream_client", c.as_path()));
        }
    }
    if let Some(o) = operator {
        out.push(("operator", o.cert_file.as_path()));
    }
    out
}

/// The certificates of a PEM file, summarised (unreadable ones left out).
pub fn summaries(path: &Path) -> Vec<principal::Summary> {
    read_certs("file", path)
        .map(|certs| certs.iter().filter_map(|c| principal::summary(c)).collect())
        .unwrap_or_default()
}

/// The earliest expiry among a file's certificates (seconds since the Unix epoch).
pub fn earliest_expiry(path: &Path) -> Option<i64> {
    summaries(path).iter().map(|s| s.not_after).min()
}

/// `check-config`'s account of the TLS settings: every certificate's subject, names and expiry.
pub fn explain(
    listen: Option<&ListenTls>,
    upstream: Option<&UpstreamTls>,
    operator: Option<&ListenTls>,
) -> String {
    let mut out = String::new();
    match listen {
        Some(l) => out.push_str(&format!(
            "listeners speak TLS (client certificates: {:?}, handshake timeout {:?})\n",
            l.client_auth, l.handshake_timeout
        )),
        None => out.push_str("listeners speak plaintext\n"),
    }
    match upstream {
        Some(u) => out.push_str(&format!(
            "brokers are reached with TLS (CA: {}, host names {})\n",
            u.ca_file
                .as_ref()
                .map_or("the system's roots".to_string(), |p| p
                    .display()
                    .to_string()),
            if u.verify_hostname {
                "verified"
            } else {
                "not verified"
            }
        )),
        None => out.push_str("brokers are reached in plaintext\n"),
    }
    for (what, path) in certificate_files(listen, upstream, operator) {
        for s in summaries(path) {
            out.push_str(&format!(
                "  {what} certificate {}: subject {}, names [{}], expires {} (unix {})\n",
                path.display(),
                s.subject,
                s.alt_names.join(", "),
                x509_parser::time::ASN1Time::from_timestamp(s.not_after)
                    .map_or_else(|_| "?".to_string(), |t| t.to_string()),
                s.not_after
            ));
        }
    }
    out
}

/// Whether two secrets (a bearer token, a SCRAM signature) are equal, in a time that does not depend
/// on where they first differ.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A reloadable TLS configuration, whatever it configures (for the watcher).
pub trait Reloadable: Send + Sync {
    fn what(&self) -> &'static str;
    fn reload(&self, force: bool) -> live::Reload;
}

impl<C: Send + Sync> Reloadable for live::Live<C> {
    fn what(&self) -> &'static str {
        self.what
    }
    fn reload(&self, force: bool) -> live::Reload {
        live::Live::reload(self, force)
    }
}

/// The listeners' files (certificate, key, client CA), watched for rotation.
fn listen_files(l: &ListenTls) -> Vec<PathBuf> {
    let mut files = vec![l.cert_file.clone(), l.key_file.clone()];
    files.extend(l.client_ca_file.clone());
    files
}

fn upstream_files(u: &UpstreamTls) -> Vec<PathBuf> {
    [&u.ca_file, &u.cert_file, &u.key_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// A listener's TLS configuration that follows its files, problems under `what` (a key path).
pub fn live_server(
    what: &'static str,
    l: &ListenTls,
) -> anyhow::Result<Arc<live::Live<ServerConfig>>> {
    let settings = l.clone();
    live::Live::new(what, listen_files(l), move || server_config(&settings))
        .map(Arc::new)
        .map_err(|p| joined(what, p))
}

/// What the data path needs of TLS, built at start from the settings; the certificates follow their
/// files (see [`live`]).
#[derive(Clone, Default)]
pub struct Tls {
    /// Clients' TLS, when the listeners speak it.
    listen: Option<Arc<live::Live<ServerConfig>>>,
    principal_rules: Vec<principal::Rule>,
    handshake_timeout: Duration,
    /// The brokers' TLS, when the proxy reaches them with it.
    upstream: Option<Arc<live::Live<ClientConfig>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("listen", &self.listen.is_some())
            .field("upstream", &self.upstream.is_some())
            .finish()
    }
}

/// The settings' problems as one error, key paths under `prefix`.
fn joined(prefix: &str, problems: Vec<TlsProblem>) -> anyhow::Error {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{prefix}.{}: {}", p.key, p.message))
        .collect();
    anyhow::anyhow!(lines.join("; "))
}

impl Tls {
    pub fn new(listen: Option<&ListenTls>, upstream: Option<&UpstreamTls>) -> anyhow::Result<Tls> {
        let mut tls = Tls::default();
        if let Some(l) = listen {
            tls.listen = Some(live_server("listen.tls", l)?);
            tls.principal_rules = l.principal_rules.clone();
            tls.handshake_timeout = l.handshake_timeout;
        }
        if let Some(u) = upstream {
            let settings = u.clone();
            let live = live::Live::new("upstream.tls", upstream_files(u), move || {
                client_config(&settings)
            })
            .map_err(|p| joined("upstream.tls", p))?;
            tls.upstream = Some(Arc::new(live));
        }
        Ok(tls)
    }

    /// The configurations that follow their files, for the watcher.
    pub fn reloadables(&self) -> Vec<Arc<dyn Reloadable>> {
        let mut out: Vec<Arc<dyn Reloadable>> = Vec::new();
        if let Some(l) = &self.listen {
            out.push(l.clone());
        }
        if let Some(u) = &self.upstream {
            out.push(u.clone());
        }
        out
    }

    /// A client's connection as the listeners speak: TLS finished within the handshake timeout (a
    /// client that stalls, or sends plaintext to a TLS port, is refused with the reason).
    pub async fn accept(&self, tcp: tokio::net::TcpStream) -> Result<Stream, String> {
        let Some(live) = &self.listen else {
            return Ok(Stream::Plain(tcp));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(live.current());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Ok(Stream::Accepted(Box::new(s))),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err(format!(
                "TLS handshake not finished within {:?}",
                self.handshake_timeout
            )),
        }
    }

    /// The client's certificate principal (`User:` + its mapped subject), on a TLS listener that
    /// verified one.
    pub fn principal(&self, stream: &Stream) -> Option<String> {
        principal::of_chain(stream.peer_certificates()?, &self.principal_rules)
    }

    /// A connection to a broker at `addr` (`host:port`), with TLS if the proxy reaches brokers so: the
    /// host is the name verified and sent as SNI.
    pub async fn connect(&self, addr: &str, timeout: Duration) -> Result<Stream, String> {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let Some(live) = &self.upstream else {
                return Ok(Stream::Plain(tcp));
            };
            let connector = tokio_rustls::TlsConnector::from(live.current());
            let host = addr
                .rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{addr}: not a host name for TLS: {e}"))?;
            connector
                .connect(name, tcp)
                .await
                .map(|s| Stream::Connected(Box::new(s)))
                .map_err(|e| format!("{addr}: TLS handshake failed: {e}"))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| Err(format!("{addr}: connect timed out after {timeout:?}")))
    }
}

//! TLS at the proxy's listeners, against real Kafka (plaintext brokers behind it): clients that speak
//! TLS are served, the handshakes that must fail do (plaintext to a TLS port, an untrusted server
//! certificate, a stalled handshake, a missing client certificate), each closing only its own
//! connection; with mTLS, the client certificate's subject is the principal policies match.
//! Certificates are made by the test (rcgen).

use crate::common::*;
use crate::producer_state::{batch, produce, send_produce};
use crate::rdkafka_clients::create_topic;
use crate::wire::Raw;
use kafka_eos_proxy::testkit::RawClient;
use kafka_eos_proxy::tls::{principal, ClientAuth, ListenTls, Stream};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A CA and what it signed, as PEM files in a directory of the test's own.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub(crate) fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(unique_topic(&format!("pki-{name}")));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA {name}"));
        params.distinguished_name = dn;
        let ca = params.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
        Pki { dir, ca, ca_key }
    }

    pub(crate) fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate and key signed by the CA, written as `<name>.pem` and `<name>.key`.
    fn issue(
        &self,
        name: &str,
        sans: &[&str],
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        self.issue_until(name, sans, cn, usage, (2031, 5, 17))
    }

    /// [`Pki::issue`], valid until midnight (UTC) of `until` (year, month, day).
    fn issue_until(
        &self,
        name: &str,
        sans: &[&str],
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
        until: (i32, u8, u8),
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "kafka-eos-proxy tests");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![usage];
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        if until.0 < 2000 {
            params.not_before = rcgen::date_time_ymd(until.0 - 1, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    /// The proxy's server certificate (for `localhost` and the test proxy's address).
    fn server(&self) -> (PathBuf, PathBuf) {
        self.issue(
            "proxy",
            &["localhost", PROXY_HOST],
            "proxy",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub(crate) fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(cn, &[], cn, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

pub(crate) fn listen_tls(pki: &Pki, auth: ClientAuth, rules: &[&str]) -> ListenTls {
    let (cert_file, key_file) = pki.server();
    ListenTls {
        cert_file,
        key_file,
        client_auth: auth,
        client_ca_file: (auth != ClientAuth::None).then(|| pki.ca_file()),
        principal_rules: rules
            .iter()
            .map(|r| principal::parse_rule(r).expect("rule"))
            .collect(),
        handshake_timeout: Duration::from_millis(800),
    }
}

/// A TLS connection to `addr` asking for `sni`, trusting `ca`, presenting `identity` if given.
pub async fn tls_connect(
    addr: &str,
    sni: &str,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((c, k)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&c)
                    .expect("cert")
                    .map(|c| c.expect("cert"))
                    .collect(),
                PrivateKeyDer::from_pem_file(&k).expect("key"),
            )
            .expect("identity"),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_string()).expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3 lets the client finish before the server judged its certificate: a round trip tells.
    use tokio::io::AsyncWriteExt;
    tls.flush().await.map_err(|e| e.to_string())?;
    Ok(tls)
}

/// A TLS server side from a certificate and key, without client certificates.
fn server_tls((cert_file, key_file): (PathBuf, PathBuf)) -> ListenTls {
    ListenTls {
        cert_file,
        key_file,
        client_auth: ClientAuth::None,
        client_ca_file: None,
        principal_rules: Vec::new(),
        handshake_timeout: Duration::from_secs(5),
    }
}

/// A raw Kafka client over TLS to `addr` (SNI `localhost`), trusting `ca`, presenting `identity`.
pub(crate) async fn tls_client(
    addr: &str,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Raw, String> {
    let tls = tls_connect(addr, "localhost", ca, identity).await?;
    Ok(Raw(RawClient::over(
        Stream::Connected(Box::new(tls)),
        "tls-test",
    )))
}

/// The proxy ends this connection within a few seconds, at most with a TLS alert record (content type
/// 21) before it closes; never with a Kafka answer.
async fn closed_after_an_alert(raw: &mut Raw, what: &str) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), raw.0.read_some(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: connection still open after 5s"));
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        got.is_empty() || got[0] == 21,
        "{what}: got {got:?}, not a TLS alert"
    );
}

async fn api_versions_ok(raw: &mut Raw) -> bool {
    use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
    use kafka_protocol::protocol::StrBytes;
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("tls-test"))
        .with_client_software_version(StrBytes::from_static_str("1.0"));
    raw.0.send(ApiKey::ApiVersions, 3, &req).await.is_ok()
        && tokio::time::timeout(Duration::from_secs(5), raw.0.recv())
            .await
            .is_ok_and(|r| r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_serves_kafka_and_refuses_bad_handshakes() {
    let pki = Pki::new("listen");
    let tls = listen_tls(&pki, ClientAuth::None, &[]);
    let proxy = start_proxy_with(Cluster::Single, move |c| c.listen.tls = Some(tls.clone())).await;
    let topic = unique_topic("tls");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));

    // A TLS client is served: its write lands.
    let mut good = tls_client(&node, &pki.ca_file(), None)
        .await
        .expect("TLS client");
    let plain = produce(
        &topic,
        None,
        vec![(0, batch(-1, -1, -1, 1, false, "over tls"))],
    );
    assert_eq!(send_produce(&mut good, &plain).await, vec![(0, 0, 0, None)]);

    // Plaintext Kafka bytes to the TLS port: closed, counted, nothing else disturbed.
    let mut plaintext = Raw::connect(&node).await;
    let _ = plaintext
        .0
        .send_bytes(&[0, 0, 0, 10, 0, 18, 0, 3, 0, 0, 0, 1, 0xff, 0xff])
        .await;
    closed_after_an_alert(&mut plaintext, "plaintext to a TLS port").await;
    // A client that does not trust the proxy's certificate does not get through.
    let other = Pki::new("other");
    assert!(tls_client(&node, &other.ca_file(), None).await.is_err());
    // A handshake that never starts is timed out.
    let mut stalled = Raw::connect(&node).await;
    stalled.expect_closed("a stalled handshake").await;
    assert!(
        proxy.closed_connections("tls_handshake") >= 2,
        "refused handshakes are counted"
    );
    // The expiry gauge holds the listener certificate's not-after (2031-05-17T00:00:00Z).
    let expiry = proxy
        .metrics()
        .tls_certificate_expiry
        .with_label_values(&["listen"])
        .get();
    assert_eq!(expiry, 1_936_742_400);
    assert_eq!(
        send_produce(&mut good, &plain).await,
        vec![(0, 0, 1, None)],
        "the good client is untouched"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_the_principal_policies_match() {
    let pki = Pki::new("mtls");
    let tls = listen_tls(
        &pki,
        ClientAuth::Required,
        &["RULE:^CN=([^,]*),O=.*$/$1/L", "DEFAULT"],
    );
    let policy = crate::policies::policies(
        r#"
policies:
  - name: mallory-needs-idempotence
    match: { topics: { prefix: ["mtls-"] }, principals: ["User:mallory"] }
    produce: { idempotence: reject }
"#,
    );
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.listen.tls = Some(tls.clone());
        c.policies = policy.clone();
    })
    .await;
    let topic = unique_topic("mtls");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let plain = produce(&topic, None, vec![(0, batch(-1, -1, -1, 1, false, "p"))]);

    let mut alice = tls_client(&node, &pki.ca_file(), Some(pki.client("Alice")))
        .await
        .expect("alice");
    assert_eq!(
        send_produce(&mut alice, &plain).await,
        vec![(0, 0, 0, None)]
    );
    let mut mallory = tls_client(&node, &pki.ca_file(), Some(pki.client("Mallory")))
        .await
        .expect("mallory");
    let refused = send_produce(&mut mallory, &plain).await;
    assert_eq!(
        refused[0].1, 44,
        "POLICY_VIOLATION for User:mallory: {refused:?}"
    );
    let events = proxy.events(kafka_eos_proxy::audit::Kind::PolicyViolation);
    assert!(
        events
            .iter()
            .any(|e| e.principal.as_deref() == Some("User:mallory")),
        "the audit line names the certificate principal: {events:?}"
    );

    // Without a certificate, or with one from another CA, a client is refused (required).
    let mut anonymous = tls_client(&node, &pki.ca_file(), None).await.ok();
    let served = match &mut anonymous {
        Some(raw) => api_versions_ok(raw).await,
        None => false,
    };
    assert!(!served, "no certificate, no service");
    let other = Pki::new("mtls-other");
    let mut stranger = tls_client(&node, &pki.ca_file(), Some(other.client("eve")))
        .await
        .ok();
    let served = match &mut stranger {
        Some(raw) => api_versions_ok(raw).await,
        None => false,
    };
    assert!(!served, "a certificate from another CA, no service");
    assert_eq!(
        send_produce(&mut alice, &plain).await,
        vec![(0, 0, 1, None)]
    );
    proxy.stop().await;
}

/// The single broker's SSL listener (scripts/kafka: the test CA's certificate for 127.0.0.1 and
/// localhost).
pub const SSL_BROKER: &str = "127.0.0.1:19097";

pub fn broker_ca() -> PathBuf {
    PathBuf::from(kafka_script(&["pki"]).trim()).join("ca.pem")
}

pub fn upstream_tls(ca: PathBuf) -> kafka_eos_proxy::tls::UpstreamTls {
    kafka_eos_proxy::tls::UpstreamTls {
        ca_file: Some(ca),
        verify_hostname: true,
        cert_file: None,
        key_file: None,
    }
}

/// A proxy with TLS on both sides: `listen` towards clients, the test CA's brokers at `broker`.
async fn tls_both_sides(broker: &'static str, listen: ListenTls) -> TestProxy {
    start_proxy_with(Cluster::Single, move |c| {
        c.upstream.bootstrap_servers = vec![broker.to_string()];
        c.upstream.tls = Some(upstream_tls(broker_ca()));
        c.listen.tls = Some(listen.clone());
    })
    .await
}

/// The proxy reaches a broker's SSL listener (CA verified, host name checked): its own metadata
/// refresh opens the node listeners, and clients, plaintext or TLS, write through it; every address
/// they learn is the proxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reaches_brokers_over_tls() {
    kafka(Cluster::Single);
    let pki = Pki::new("both");
    let listen = listen_tls(&pki, ClientAuth::None, &[]);
    let plain_proxy = start_proxy_with(Cluster::Single, |c| {
        c.upstream.bootstrap_servers = vec![SSL_BROKER.to_string()];
        c.upstream.tls = Some(upstream_tls(broker_ca()));
    })
    .await;
    let both = tls_both_sides(SSL_BROKER, listen).await;
    let topic = unique_topic("tls-upstream");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let plain = produce(&topic, None, vec![(0, batch(-1, -1, -1, 1, false, "u"))]);

    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", plain_proxy.broker_port(1))).await;
    assert_eq!(send_produce(&mut raw, &plain).await, vec![(0, 0, 0, None)]);
    let md = raw.topic_metadata(&topic).await;
    for b in &md.brokers {
        assert_proxy_address(&plain_proxy, &format!("{}:{}", b.host.as_str(), b.port));
    }
    let node = format!("{PROXY_HOST}:{}", both.broker_port(1));
    let mut tls = tls_client(&node, &pki.ca_file(), None)
        .await
        .expect("TLS client");
    assert_eq!(send_produce(&mut tls, &plain).await, vec![(0, 0, 1, None)]);
    plain_proxy.stop().await;
    both.stop().await;
}

/// A broker certificate the proxy cannot trust: no session reaches the broker (the client's
/// connection is closed with a log line), and the proxy itself keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_is_refused() {
    kafka(Cluster::Single);
    let other = Pki::new("not-the-brokers");
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.upstream.bootstrap_servers = vec![SSL_BROKER.to_string()];
        c.upstream.tls = Some(upstream_tls(other.ca_file()));
    })
    .await;
    let mut raw = Raw::connect(proxy.bootstrap()).await;
    raw.expect_closed("a client whose broker cannot be trusted")
        .await;
    assert!(
        proxy.closed_connections("upstream_unreachable") >= 1,
        "counted as upstream_unreachable"
    );
    proxy.stop_answering_nothing().await;
}

/// kafka-clients 4.4 (with a client certificate, mTLS) and franz-go 1.22 (without one) write and read
/// through a proxy with TLS on both sides: every record once, only proxy addresses learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_and_franz_go_through_tls_on_both_sides() {
    kafka(Cluster::Single);
    let pki = Pki::new("clients");
    let listen = listen_tls(&pki, ClientAuth::Requested, &["RULE:^CN=([^,]*),.*$/$1/"]);
    let proxy = tls_both_sides(SSL_BROKER, listen).await;
    let ca = pki.ca_file().display().to_string();
    // Java's PEM key store: the PKCS#8 key, then the certificate.
    let (cert, key) = pki.client("java-app");
    let keystore = pki.dir.join("java-app-keystore.pem");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&key).expect("key"),
        std::fs::read_to_string(&cert).expect("cert")
    );
    std::fs::write(&keystore, both).expect("keystore");
    let java = crate::java_client::run_java_with(
        "produce",
        &proxy,
        &[
            ("EOS_TLS_CA", ca.clone()),
            ("EOS_TLS_KEYSTORE", keystore.display().to_string()),
        ],
    )
    .await;
    assert_eq!(java["consumed"], vec!["200"]);
    let go = crate::franz_go::run_go_with("produce", &proxy, &[("EOS_TLS_CA", ca)]).await;
    assert_eq!(go["consumed"], vec!["500"]);
    for b in &go["broker"] {
        assert_proxy_address(&proxy, b);
    }
    proxy.stop().await;
}

/// Replaces `to` with a copy of `from` the way a Secret volume or cert-manager does: written beside it,
/// then renamed over it.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

/// `credential_reloads_total{source, result}`.
fn reloads(proxy: &TestProxy, source: &str, result: &str) -> u64 {
    proxy
        .metrics()
        .credential_reloads
        .with_label_values(&[source, result])
        .get()
}

/// Polls `done` for up to 10 s.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 10 s: {what}");
}

/// The listener's certificate is replaced on disk under traffic: new connections get the new one (from
/// another CA, so only it verifies), the connection opened before keeps writing, the expiry gauge
/// follows; a broken file is refused with a count and the last good certificate stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let first = Pki::new("rotate-a");
    let second = Pki::new("rotate-b");
    let tls = listen_tls(&first, ClientAuth::None, &[]);
    let (cert, key) = (tls.cert_file.clone(), tls.key_file.clone());
    let proxy = start_proxy_with(Cluster::Single, move |c| c.listen.tls = Some(tls.clone())).await;
    let topic = unique_topic("rotate");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let plain = produce(&topic, None, vec![(0, batch(-1, -1, -1, 1, false, "r"))]);
    let mut before = tls_client(&node, &first.ca_file(), None)
        .await
        .expect("first certificate");
    assert_eq!(send_produce(&mut before, &plain).await[0].1, 0);

    let (new_cert, new_key) = second.issue_until(
        "proxy",
        &["localhost", PROXY_HOST],
        "proxy",
        ExtendedKeyUsagePurpose::ServerAuth,
        (2032, 1, 1),
    );
    replace_file(&new_key, &key);
    replace_file(&new_cert, &cert);
    eventually("new connections get the new certificate", async || {
        tls_client(&node, &second.ca_file(), None).await.is_ok()
    })
    .await;
    assert!(
        tls_client(&node, &first.ca_file(), None).await.is_err(),
        "the old certificate is no longer presented"
    );
    assert!(reloads(&proxy, "listen.tls", "applied") >= 1);
    assert_eq!(
        proxy
            .metrics()
            .tls_certificate_expiry
            .with_label_values(&["listen"])
            .get(),
        1_956_528_000,
        "the gauge follows the new certificate (2032-01-01)"
    );
    let offsets: Vec<i64> = vec![
        send_produce(&mut before, &plain).await[0].2,
        send_produce(&mut before, &plain).await[0].2,
    ];
    assert_eq!(
        offsets,
        vec![1, 2],
        "the connection from before keeps going"
    );

    // A broken certificate file: refused, counted, the last good one stays.
    let refused = reloads(&proxy, "listen.tls", "refused");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    eventually("the broken file is refused", async || {
        reloads(&proxy, "listen.tls", "refused") > refused
    })
    .await;
    let mut after = tls_client(&node, &second.ca_file(), None)
        .await
        .expect("still the last good certificate");
    assert_eq!(send_produce(&mut after, &plain).await[0].2, 3);
    proxy.stop().await;
}

/// One GET over TLS to the operator endpoint, with `token` as a bearer token if given: the status.
async fn https_get(addr: &str, ca: &Path, path: &str, token: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(addr, "localhost", ca, None)
        .await
        .expect("TLS to the operator endpoint");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `metrics.tls` and `metrics.token_file`: the endpoint speaks TLS only; `/metrics` and `/producers`
/// need the token, `/healthz` and `/readyz` do not; a new token file replaces the old token, a broken
/// one is refused and the token before it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_endpoint_can_require_tls_and_a_token() {
    let pki = Pki::new("operator");
    let (cert_file, key_file) = pki.server();
    let token_file = pki.dir.join("token");
    std::fs::write(&token_file, "first-token\n").expect("token");
    let operator = server_tls((cert_file, key_file));
    let token = token_file.clone();
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.metrics.listen = Some(format!("{PROXY_HOST}:0"));
        c.metrics.tls = Some(operator.clone());
        c.metrics.token_file = Some(token.clone());
    })
    .await;
    let http = proxy
        .proxy
        .as_ref()
        .and_then(|p| p.http_addr())
        .expect("endpoint")
        .to_string();
    let ca = pki.ca_file();
    assert_eq!(https_get(&http, &ca, "/healthz", None).await, 200);
    assert_eq!(https_get(&http, &ca, "/readyz", None).await, 200);
    for path in ["/metrics", "/producers"] {
        assert_eq!(https_get(&http, &ca, path, None).await, 401, "{path}");
        assert_eq!(https_get(&http, &ca, path, Some("first-tokeX")).await, 401);
        assert_eq!(https_get(&http, &ca, path, Some("first-token")).await, 200);
    }
    // Plaintext HTTP gets no answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&http).await.expect("tcp");
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        assert!(
            !answer.starts_with(b"HTTP"),
            "plaintext answered: {answer:?}"
        );
    }
    let other = pki.dir.join("token2");
    std::fs::write(&other, "second-token").expect("token");
    replace_file(&other, &token_file);
    eventually("the new token is in force", async || {
        https_get(&http, &ca, "/metrics", Some("second-token")).await == 200
    })
    .await;
    assert_eq!(
        https_get(&http, &ca, "/metrics", Some("first-token")).await,
        401
    );
    std::fs::write(&token_file, "  \n").expect("empty token");
    eventually("the empty token file is refused", async || {
        reloads(&proxy, "metrics.token_file", "refused") >= 1
    })
    .await;
    assert_eq!(
        https_get(&http, &ca, "/metrics", Some("second-token")).await,
        200,
        "the last good token stays"
    );
    assert!(reloads(&proxy, "metrics.token_file", "applied") >= 1);
    proxy.stop_answering_nothing().await;
}

/// The names SNI routing tests use: the bootstrap name, and brokers as `broker-<id>.kafka.test`.
pub(crate) const SNI_BOOTSTRAP: &str = "bootstrap.kafka.test";
const SNI_PATTERN: &str = "broker-$(nodeId).kafka.test";

/// A proxy in front of `cluster` in SNI mode: every broker on the bootstrap port, picked by name (a
/// certificate for `*.kafka.test` and the proxy's address).
pub(crate) async fn sni_proxy(cluster: Cluster, name: &str) -> (TestProxy, Pki) {
    use kafka_eos_proxy::config::{BrokerPorts, SniPattern};
    let pki = Pki::new(name);
    let (cert_file, key_file) = pki.issue(
        "proxy",
        &[SNI_BOOTSTRAP, "*.kafka.test", PROXY_HOST],
        "proxy",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let tls = server_tls((cert_file, key_file));
    let proxy = start_proxy_with(cluster, move |c| {
        c.listen.tls = Some(tls.clone());
        c.listen.advertised_host = SNI_BOOTSTRAP.to_string();
        c.listen.broker_ports = BrokerPorts::Sni(SniPattern::parse(SNI_PATTERN).expect("pattern"));
    })
    .await;
    (proxy, pki)
}

/// A raw Kafka client to the SNI proxy's one port, asking for host name `name`.
pub(crate) async fn sni_client(proxy: &TestProxy, pki: &Pki, name: &str) -> Result<Raw, String> {
    let tls = tls_connect(proxy.bootstrap(), name, &pki.ca_file(), None).await?;
    Ok(Raw(RawClient::over(
        Stream::Connected(Box::new(tls)),
        "sni-test",
    )))
}

pub(crate) fn sni_broker(node: i32) -> String {
    SNI_PATTERN.replace("$(nodeId)", &node.to_string())
}

/// `listen.broker_ports.sni` in front of the three-broker cluster: the answers name every broker as
/// `broker-<id>.kafka.test` on the one port, each name reaches its own broker (a write to a partition
/// another broker leads gets NOT_LEADER_OR_FOLLOWER), and a name that is neither the bootstrap name nor
/// an announced broker's, or no name at all, is refused with a log line and
/// `connections_closed_total{reason="sni_unknown"}`, disturbing nobody. kafka-clients 4.4 then writes
/// and reads through it, resolving the names to the proxy (a hosts file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routing_reaches_every_broker_on_one_port() {
    let (proxy, pki) = sni_proxy(Cluster::Three, "sni").await;
    let topic = unique_topic("sni");
    create_topic(&kafka(Cluster::Three), &topic, 3, 1).await;
    let port = proxy
        .bootstrap()
        .rsplit_once(':')
        .expect("port")
        .1
        .to_string();

    let mut boot = sni_client(&proxy, &pki, SNI_BOOTSTRAP)
        .await
        .expect("bootstrap name");
    let md = boot.topic_metadata(&topic).await;
    let mut named: Vec<String> = md
        .brokers
        .iter()
        .map(|b| format!("{}:{}", b.host.as_str(), b.port))
        .collect();
    named.sort();
    let expected: Vec<String> = (1..=3)
        .map(|n| format!("{}:{port}", sni_broker(n)))
        .collect();
    assert_eq!(
        named, expected,
        "every broker named by the pattern on the one port"
    );

    let leaders: Vec<(i32, i32)> = md.topics[0]
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.leader_id.0))
        .collect();
    assert_eq!(leaders.len(), 3);
    for (partition, leader) in &leaders {
        let req = produce(
            &topic,
            None,
            vec![(*partition, batch(-1, -1, -1, 1, false, "sni"))],
        );
        let mut right = sni_client(&proxy, &pki, &sni_broker(*leader))
            .await
            .expect("broker name");
        assert_eq!(
            send_produce(&mut right, &req).await[0].1,
            0,
            "partition {partition} through its leader's name"
        );
        let other = leaders
            .iter()
            .map(|l| l.1)
            .find(|n| n != leader)
            .expect("other");
        let mut wrong = sni_client(&proxy, &pki, &sni_broker(other))
            .await
            .expect("broker name");
        assert_eq!(
            send_produce(&mut wrong, &req).await[0].1,
            6,
            "partition {partition} through another broker's name reaches that broker"
        );
    }

    // Names the proxy does not route: refused, each only its own connection.
    for name in ["other.kafka.test", &sni_broker(42), PROXY_HOST] {
        let served = match sni_client(&proxy, &pki, name).await {
            Ok(mut raw) => api_versions_ok(&mut raw).await,
            Err(_) => false,
        };
        assert!(!served, "{name} is not routed");
    }
    assert!(proxy.closed_connections("sni_unknown") >= 3);
    assert!(
        api_versions_ok(&mut boot).await,
        "the bootstrap connection is untouched"
    );

    // kafka-clients 4.4 resolves the names to the proxy through a hosts file of its own.
    let hosts = pki.dir.join("hosts");
    let names: Vec<String> = std::iter::once(SNI_BOOTSTRAP.to_string())
        .chain((1..=3).map(sni_broker))
        .collect();
    std::fs::write(
        &hosts,
        format!("{PROXY_HOST} {} localhost\n", names.join(" ")),
    )
    .expect("hosts");
    let mut by_name = TestProxy {
        bootstrap: format!("{SNI_BOOTSTRAP}:{port}"),
        ..proxy
    };
    let env = [
        ("EOS_TLS_CA", pki.ca_file().display().to_string()),
        (
            "JAVA_TOOL_OPTIONS",
            format!("-Djdk.net.hosts.file={}", hosts.display()),
        ),
    ];
    let java = crate::java_client::run_java_with("produce", &by_name, &env).await;
    assert_eq!(java["consumed"], vec!["200"]);
    let admin = crate::java_client::run_java_with("admin", &by_name, &env).await;
    assert_eq!(admin["broker"].len(), 3, "{admin:?}");
    for b in &admin["broker"] {
        let address = b.rsplit('@').next().expect("id@host:port");
        let (host, p) = address.rsplit_once(':').expect("host:port");
        assert!(
            names.contains(&host.to_string()) && p == port,
            "the Java client learned {b}"
        );
    }
    by_name.bootstrap = format!("{PROXY_HOST}:{port}");
    by_name.stop().await;
}

/// The single broker's SASL_SSL listener (SCRAM-SHA-256/512 and PLAIN; user alice, see scripts/kafka).
pub const SASL_SSL_BROKER: &str = "127.0.0.1:19098";

fn upstream_sasl(
    dir: &Path,
    mechanism: &str,
    password: &str,
) -> kafka_eos_proxy::server::sasl::UpstreamSasl {
    let password_file = dir.join(format!("password-{mechanism}-{}", password.len()));
    std::fs::write(&password_file, format!("{password}\n")).expect("password file");
    kafka_eos_proxy::server::sasl::UpstreamSasl {
        mechanism: kafka_eos_proxy::server::sasl::Mechanism::parse(mechanism).expect("mechanism"),
        username: "alice".into(),
        password_file,
    }
}

/// In front of a cluster whose listener needs SASL over TLS, the proxy's own requests log in with
/// `upstream.sasl` (SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN): its metadata refresh succeeds and a topic
/// id no answer taught is named by its own lookup. Without credentials, or with a wrong password, the
/// refresh fails and says why. A SCRAM client (kafka-clients 4.4, SASL_SSL to the proxy's TLS listener)
/// logs in through the proxy, untouched, and writes and reads every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_logs_in_to_a_sasl_ssl_cluster_and_scram_clients_pass_through() {
    kafka(Cluster::Single);
    let pki = Pki::new("sasl-ssl");
    let listen = listen_tls(&pki, ClientAuth::None, &[]);
    let start = |sasl: Option<kafka_eos_proxy::server::sasl::UpstreamSasl>,
                 listen: Option<ListenTls>| {
        start_proxy_with(Cluster::Single, move |c| {
            c.upstream.bootstrap_servers = vec![SASL_SSL_BROKER.to_string()];
            c.upstream.tls = Some(upstream_tls(broker_ca()));
            c.upstream.sasl = sasl.clone();
            c.listen.tls = listen.clone();
        })
    };
    use kafka_eos_proxy::server::discovery::{name_topic_ids, refresh_once};
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
        let proxy = start(
            Some(upstream_sasl(&pki.dir, mechanism, "alice-secret")),
            None,
        )
        .await;
        let shared = proxy.proxy.as_ref().expect("running").shared().clone();
        let brokers = refresh_once(&shared)
            .await
            .unwrap_or_else(|e| panic!("{mechanism}: {e:#}"));
        assert_eq!(brokers, 1, "{mechanism}");
        proxy.stop_answering_nothing().await;
    }
    for (what, sasl) in [
        ("no credentials", None),
        (
            "a wrong password",
            Some(upstream_sasl(&pki.dir, "SCRAM-SHA-256", "wrong")),
        ),
    ] {
        let proxy = start(sasl, None).await;
        let shared = proxy.proxy.as_ref().expect("running").shared().clone();
        let e = refresh_once(&shared).await.expect_err(what);
        assert!(
            !shared
                .upstream_ready
                .load(std::sync::atomic::Ordering::Relaxed),
            "{what}: not ready"
        );
        if what == "a wrong password" {
            assert!(
                format!("{e:#}").contains("SASL login as 'alice' failed"),
                "{e:#}"
            );
        }
        proxy.stop_answering_nothing().await;
    }

    let proxy = start(
        Some(upstream_sasl(&pki.dir, "SCRAM-SHA-256", "alice-secret")),
        Some(listen),
    )
    .await;
    let shared = proxy.proxy.as_ref().expect("running").shared().clone();
    // A topic created and described directly: its id reaches the proxy first through its own lookup.
    let topic = unique_topic("sasl-ssl");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let mut direct = Raw::connect(&kafka(Cluster::Single)).await;
    let id = *direct.topic_metadata(&topic).await.topics[0]
        .topic_id
        .as_bytes();
    assert!(name_topic_ids(&shared.session, &[id]).await.is_empty());
    assert_eq!(
        shared.brokers.topics.name(&id).as_deref(),
        Some(topic.as_str()),
        "named by the proxy's own SASL_SSL lookup"
    );

    let env = [
        ("EOS_TLS_CA", pki.ca_file().display().to_string()),
        ("EOS_SASL_MECHANISM", "SCRAM-SHA-256".to_string()),
        ("EOS_SASL_USER", "alice".to_string()),
        ("EOS_SASL_PASSWORD", "alice-secret".to_string()),
    ];
    let java = crate::java_client::run_java_with("produce", &proxy, &env).await;
    assert_eq!(java["consumed"], vec!["200"]);
    proxy.stop().await;
}

/// The audit topic's producer (librdkafka) reaches a SASL_SSL cluster with the upstream settings
/// (SCRAM-SHA-512 over TLS, the broker's CA): an anomaly's audit event lands in the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_a_topic_on_a_sasl_ssl_cluster() {
    use crate::producer_state::init_producer_id;
    let pki = Pki::new("audit-sasl");
    let audit_topic = unique_topic("audit-sasl");
    create_topic(&kafka(Cluster::Single), &audit_topic, 1, 1).await;
    let (t, sasl) = (
        audit_topic.clone(),
        upstream_sasl(&pki.dir, "SCRAM-SHA-512", "alice-secret"),
    );
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.audit.kafka = Some(kafka_eos_proxy::config::KafkaAuditConfig {
            topic: t.clone(),
            bootstrap_servers: vec![SASL_SSL_BROKER.to_string()],
            queue: 100,
            tls: Some(upstream_tls(broker_ca())),
            sasl: Some(sasl.clone()),
        });
    })
    .await;
    let topic = unique_topic("audited-sasl");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, e) = init_producer_id(&mut raw, None).await;
    let first = produce(&topic, None, vec![(0, batch(pid, e, 0, 1, false, "a"))]);
    assert_eq!(send_produce(&mut raw, &first).await[0].1, 0);
    let gap = produce(&topic, None, vec![(0, batch(pid, e, 7, 1, false, "a"))]);
    assert_eq!(send_produce(&mut raw, &gap).await[0].1, 45);
    let bs = kafka(Cluster::Single);
    let t = audit_topic.clone();
    let events = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let mut cfg = crate::rdkafka_clients::client_config(&bs);
        cfg.set("group.id", unique_topic("audit-sasl-reader"))
            .set("auto.offset.reset", "earliest");
        let c: BaseConsumer = cfg.create().expect("consumer");
        c.subscribe(&[&t]).expect("subscribe");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let value: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).expect("json");
                return Some(value);
            }
        }
        None
    })
    .await
    .expect("reader");
    let event = events.expect("an audit event in the topic within 30 s");
    assert_eq!(event["kind"], "out_of_order_sequence");
    assert_eq!(event["producer_id"], pid);
    proxy.stop().await;
}

/// A TCP relay on `bind` (another loopback address) to `to`: the same broker under an address its
/// certificate does not name.
async fn relay(bind: &str, to: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .expect("relay bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// The refusals the issue lists besides a wrong CA: a broker reached under a name its certificate does
/// not carry is refused (unless `verify_hostname: false`, which still checks the chain), and a client
/// certificate that has expired is refused under mTLS while a valid one from the same CA is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misnamed_brokers_and_expired_client_certificates_are_refused() {
    use kafka_eos_proxy::server::discovery::refresh_once;
    kafka(Cluster::Single);
    // 127.0.0.2 is loopback too, but the broker's certificate names 127.0.0.1 and localhost only.
    let misnamed = relay("127.0.0.2:0", SSL_BROKER).await;
    for verify in [true, false] {
        let m = misnamed.clone();
        let proxy = start_proxy_with(Cluster::Single, move |c| {
            c.upstream.bootstrap_servers = vec![m.clone()];
            let mut tls = upstream_tls(broker_ca());
            tls.verify_hostname = verify;
            c.upstream.tls = Some(tls);
        })
        .await;
        let shared = proxy.proxy.as_ref().expect("running").shared().clone();
        let outcome = refresh_once(&shared).await;
        if verify {
            let e = format!("{:#}", outcome.expect_err("a misnamed broker"));
            assert!(e.contains("not valid for name"), "{e}");
        } else {
            assert_eq!(outcome.expect("names not checked"), 1);
        }
        proxy.stop_answering_nothing().await;
    }

    let pki = Pki::new("expired");
    let tls = listen_tls(&pki, ClientAuth::Required, &[]);
    let proxy = start_proxy_with(Cluster::Single, move |c| c.listen.tls = Some(tls.clone())).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let expired = pki.issue_until(
        "old-client",
        &[],
        "old-client",
        ExtendedKeyUsagePurpose::ClientAuth,
        (1999, 1, 1),
    );
    let served = match tls_client(&node, &pki.ca_file(), Some(expired)).await {
        Ok(mut raw) => api_versions_ok(&mut raw).await,
        Err(_) => false,
    };
    assert!(!served, "an expired client certificate is not served");
    let mut valid = tls_client(&node, &pki.ca_file(), Some(pki.client("new-client")))
        .await
        .expect("a valid certificate");
    assert!(api_versions_ok(&mut valid).await);
    assert!(proxy.closed_connections("tls_handshake") >= 1);
    proxy.stop().await;
}

/// The first `n` values of a topic, read from the broker directly.
async fn read_back(topic: &str, n: usize) -> Vec<String> {
    let (direct, t) = (kafka(Cluster::Single), topic.to_string());
    tokio::task::spawn_blocking(move || {
        crate::rdkafka_clients::read_all(&direct, &t, "read_uncommitted", n)
    })
    .await
    .expect("reader")
}

/// librdkafka 2.12 as a TLS client: with a client certificate (mTLS) to a proxy
/// in front of the plaintext broker, and with SCRAM-SHA-512 over TLS (SASL_SSL) to a proxy in front of
/// the SASL_SSL listener; every record written once, read back directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_through_tls_with_a_certificate_and_with_scram() {
    use crate::rdkafka_clients::produce_values;
    let pki = Pki::new("librdkafka");
    let mtls = listen_tls(&pki, ClientAuth::Required, &["RULE:^CN=([^,]*),.*$/$1/"]);
    let plain_upstream = start_proxy_with(Cluster::Single, move |c| {
        c.listen.tls = Some(mtls.clone());
    })
    .await;
    let tls = listen_tls(&pki, ClientAuth::None, &[]);
    let sasl_upstream = tls_both_sides(SASL_SSL_BROKER, tls).await;
    let ca = pki.ca_file().display().to_string();
    let (cert, key) = pki.client("rdkafka-app");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let values: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();

    let topic = unique_topic("rdkafka-mtls");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    produce_values(
        plain_upstream.bootstrap(),
        &topic,
        &values,
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &ca),
            ("ssl.certificate.location", &cert),
            ("ssl.key.location", &key),
            ("enable.idempotence", "true"),
        ],
    )
    .await;
    assert_eq!(read_back(&topic, 100).await, values);
    assert_eq!(
        plain_upstream
            .proxy
            .as_ref()
            .expect("running")
            .shared()
            .guard
            .store
            .len(),
        1,
        "the idempotent producer is tracked through TLS"
    );
    let principal = "principal=\"User:rdkafka-app\"";
    assert!(
        plain_upstream
            .metrics()
            .render()
            .lines()
            .any(|l| l.starts_with("kafka_eos_proxy_producer_principal{") && l.contains(principal)),
        "its series names the certificate principal"
    );

    let topic = unique_topic("rdkafka-scram");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    produce_values(
        sasl_upstream.bootstrap(),
        &topic,
        &values,
        &[
            ("security.protocol", "sasl_ssl"),
            ("ssl.ca.location", &ca),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "alice"),
            ("sasl.password", "alice-secret"),
        ],
    )
    .await;
    assert_eq!(read_back(&topic, 100).await, values);
    plain_upstream.stop().await;
    sasl_upstream.stop().await;
}

//! Authentication and TLS against servers that demand them (issue 12): nats-server with TLS and
//! client certificates (`verify: true`), with a CA and certificates this test generates; nkey
//! users whose seed the function reads from a file. Each works end to end, and each wrong
//! credential fails the start with a message that names the problem.
//!
//! The certificates come from `rcgen` (pure Rust, on the `ring` the TLS stack already uses), not
//! from the `openssl` CLI: no tool to find on the machine, and the test states exactly what each
//! certificate is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::NatsServer;
use jetfn_tests::commands::{account_config, send, start_account};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A certificate authority of the test's own.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Authority { cert, key }
    }

    /// Writes a certificate for `purpose`, valid for 127.0.0.1 and localhost, and its key:
    /// `<dir>/<name>.pem`, `<dir>/<name>-key.pem`.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        purpose: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Writes the CA certificate to `<dir>/<name>.pem`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

/// The files of one TLS set-up: the CA the server trusts, a server certificate, a client
/// certificate, and a CA nobody uses.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("jetfn test CA");
    let other = Authority::new("some other CA");
    Pki {
        ca: ca.write(dir.path(), "ca"),
        other_ca: other.write(dir.path(), "other-ca"),
        server: ca.issue(dir.path(), "server", ExtendedKeyUsagePurpose::ServerAuth),
        client: ca.issue(dir.path(), "client", ExtendedKeyUsagePurpose::ClientAuth),
        _dir: dir,
    }
}

/// A nats-server that requires TLS and a client certificate issued by the test's CA.
async fn tls_server(pki: &Pki) -> NatsServer {
    let config = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
        pki.server.0, pki.server.1, pki.ca
    );
    NatsServer::builder()
        .config(config)
        .probe_tls(&pki.ca, &pki.client.0, &pki.client.1)
        .start()
        .await
        .unwrap()
}

/// A client of the TLS server, with the test's client certificate.
async fn tls_client(nats: &NatsServer, pki: &Pki) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client.0.clone(), pki.client.1.clone())
        .connect(nats.url())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_connects_over_tls_with_a_client_certificate() {
    let pki = pki();
    let nats = tls_server(&pki).await;
    let mut config = account_config(&nats);
    config.nats.tls_required = true;
    config.nats.tls_ca = Some(pki.ca.clone());
    config.nats.tls_cert = Some(pki.client.0.clone());
    config.nats.tls_key = Some(pki.client.1.clone());
    let function = start_account(config).await.unwrap();
    let client = tls_client(&nats, &pki).await;
    let sent = send(
        &client,
        "tls",
        "open",
        json!({"owner": "Tee"}),
        Some("tls-1"),
    )
    .await
    .unwrap();
    assert_eq!(sent.accepted().events, ["AccountOpened"]);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_a_missing_client_certificate_fails_the_start_naming_tls() {
    let pki = pki();
    let nats = tls_server(&pki).await;

    let mut wrong_ca = account_config(&nats);
    wrong_ca.nats.tls_required = true;
    wrong_ca.nats.tls_ca = Some(pki.other_ca.clone());
    wrong_ca.nats.tls_cert = Some(pki.client.0.clone());
    wrong_ca.nats.tls_key = Some(pki.client.1.clone());
    let message = format!("{:#}", start_account(wrong_ca).await.unwrap_err());
    println!("wrong CA: {message}");
    let lower = message.to_lowercase();
    assert!(
        message.contains("TLS handshake failed")
            && message.contains("other-ca.pem")
            && lower.contains("certificate"),
        "{message}"
    );

    let mut no_client_cert = account_config(&nats);
    no_client_cert.nats.tls_required = true;
    no_client_cert.nats.tls_ca = Some(pki.ca.clone());
    no_client_cert.nats.connect_timeout = std::time::Duration::from_secs(2);
    let message = format!("{:#}", start_account(no_client_cert).await.unwrap_err());
    println!("no client certificate: {message}");
    assert!(message.contains("TLS handshake failed"), "{message}");
}

/// A nats-server whose users are the nkey `public` and a password user for the probe.
async fn nkey_server(public: &str) -> NatsServer {
    let config = format!(
        "authorization {{\n  users: [\n    {{ user: probe, password: probe-pw }}\n    {{ nkey: {public} }}\n  ]\n}}\n"
    );
    NatsServer::builder()
        .config(config)
        .login("probe", "probe-pw")
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_logs_in_with_an_nkey_seed_file_and_a_wrong_seed_fails_the_start() {
    let user = nkeys::KeyPair::new_user();
    let nats = nkey_server(&user.public_key()).await;
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("account.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();

    let mut config = account_config(&nats);
    config.nats.nkey_seed_file = Some(seed_file.clone());
    let function = start_account(config).await.unwrap();
    let client =
        async_nats::ConnectOptions::with_user_and_password("probe".into(), "probe-pw".into())
            .connect(nats.url())
            .await
            .unwrap();
    let sent = send(&client, "nk", "open", json!({"owner": "Nk"}), Some("nk-1"))
        .await
        .unwrap();
    assert_eq!(sent.accepted().events, ["AccountOpened"]);
    function.stop().await.unwrap();

    let stranger = nkeys::KeyPair::new_user();
    let wrong_file = dir.path().join("stranger.nk");
    std::fs::write(&wrong_file, stranger.seed().unwrap()).unwrap();
    let mut wrong = account_config(&nats);
    wrong.nats.nkey_seed_file = Some(wrong_file);
    let message = format!("{:#}", start_account(wrong).await.unwrap_err());
    println!("unknown nkey: {message}");
    assert!(
        message.to_lowercase().contains("authorization"),
        "{message}"
    );
    assert!(
        !message.contains(&stranger.seed().unwrap()),
        "the seed leaked: {message}"
    );

    let mut missing = account_config(&nats);
    missing.nats.nkey_seed_file = Some(dir.path().join("absent.nk"));
    let message = format!("{:#}", start_account(missing).await.unwrap_err());
    assert!(
        message.contains("nats.nkey_seed_file") && message.contains("absent.nk"),
        "{message}"
    );
}

//! Authentication and TLS against servers that demand them (issue 12): nats-server with TLS and
//! client certificates (`verify: true`), with a CA and certificates this test generates; nkey
//! users whose seed the function reads from a file. Each works end to end, and each wrong
//! credential fails the start with a message that names the problem.
//!
//! The certificates come from `rcgen` (pure Rust, on the `ring` the TLS stack already uses), not
//! from the `openssl` CLI: no tool to find on the machine, and the test states exactly what each
//! certificate is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::{account_config, send, start_account};
use jetfn_tests::readmodels::only_acl_user;
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;

/// Opens account `id` through the function, as a client on `client`, and checks it was opened.
async fn opens_an_account(client: &async_nats::Client, id: &str, command_id: &str) {
    let sent = send(
        client,
        id,
        "open",
        json!({"owner": "Someone"}),
        Some(command_id),
    )
    .await
    .unwrap();
    assert_eq!(sent.accepted().events, ["AccountOpened"], "{id}");
}

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
    opens_an_account(&client, "tls", "tls-1").await;
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

/// Runs the account function binary at `RUST_LOG=trace` with `credential` until it serves, stops
/// it, and panics if `secret` appears in its log.
async fn assert_no_secret_in_trace_log(
    nats: &NatsServer,
    credential: (&'static str, String),
    secret: &str,
) {
    let mut process = FunctionProcess::spawn(
        "account",
        &[
            ("NATS_URL", nats.url()),
            credential,
            ("RUST_LOG", "trace".into()),
        ],
    )
    .unwrap();
    process
        .wait_for_log("command function ready", std::time::Duration::from_secs(30))
        .await
        .unwrap();
    process.terminate().unwrap();
    process
        .wait(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        !process.log().contains(secret),
        "the seed leaked into the trace log"
    );
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
    opens_an_account(&client, "nk", "nk-1").await;
    function.stop().await.unwrap();
    assert_no_secret_in_trace_log(
        &nats,
        (
            "JETFN_NATS__NKEY_SEED_FILE",
            seed_file.display().to_string(),
        ),
        &user.seed().unwrap(),
    )
    .await;

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

/// A JWT as nats-server's decentralised auth reads it: `ed25519-nkey`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use data_encoding::BASE64URL_NOPAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": now - 60,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}

/// A `.creds` file: the user's JWT and its nkey seed.
fn creds(dir: &Path, name: &str, jwt: &str, user: &nkeys::KeyPair) -> PathBuf {
    let path = dir.join(format!("{name}.creds"));
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn user_claims() -> serde_json::Value {
    json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_logs_in_with_a_creds_file_and_a_revoked_or_foreign_one_fails_the_start() {
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let (user, revoked, foreign_account) = (
        nkeys::KeyPair::new_user(),
        nkeys::KeyPair::new_user(),
        nkeys::KeyPair::new_account(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1,
        "consumer": -1
    });
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "jetfn-test-operator",
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2, "limits": {"subs": -1, "conn": -1}}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "app",
        json!({
            "type": "account", "version": 2, "limits": unlimited,
            // Users issued up to now are revoked.
            "revocations": {revoked.public_key(): now},
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let good = creds(
        dir.path(),
        "account",
        &jwt(&account, &user.public_key(), "account", user_claims()),
        &user,
    );
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
        system.public_key(),
        system.public_key(),
        account.public_key(),
    );
    let nats = NatsServer::builder()
        .config(config)
        .probe_credentials(&good)
        .start()
        .await
        .unwrap();

    let mut config = account_config(&nats);
    config.nats.creds_file = Some(good.clone());
    let function = start_account(config).await.unwrap();
    let client = async_nats::ConnectOptions::with_credentials_file(&good)
        .await
        .unwrap()
        .connect(nats.url())
        .await
        .unwrap();
    opens_an_account(&client, "jwt", "jwt-1").await;
    function.stop().await.unwrap();
    // The function binary at trace level logs nothing of the seed.
    assert_no_secret_in_trace_log(
        &nats,
        ("JETFN_NATS__CREDS_FILE", good.display().to_string()),
        &user.seed().unwrap(),
    )
    .await;

    let revoked_creds = creds(
        dir.path(),
        "revoked",
        &jwt(&account, &revoked.public_key(), "revoked", user_claims()),
        &revoked,
    );
    let foreign_creds = creds(
        dir.path(),
        "foreign",
        &jwt(
            &foreign_account,
            &user.public_key(),
            "foreign",
            user_claims(),
        ),
        &user,
    );
    for (what, path) in [("revoked", revoked_creds), ("foreign", foreign_creds)] {
        let mut config = account_config(&nats);
        config.nats.creds_file = Some(path);
        let message = format!("{:#}", start_account(config).await.unwrap_err());
        println!("{what} creds: {message}");
        assert!(
            message.contains("cannot connect to NATS")
                && message.to_lowercase().contains("authorization"),
            "{what}: {message}"
        );
        assert!(
            !message.contains(&revoked.seed().unwrap()) && !message.contains(&user.seed().unwrap())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_uses_redis_over_tls_as_an_acl_user_and_a_wrong_ca_fails_its_start() {
    const PASSWORD: &str = "rediss-Pa55word";
    let pki = pki();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::builder()
        .tls(&pki.server.0, &pki.server.1, &pki.ca)
        .unwrap()
        .start()
        .await
        .unwrap();
    only_acl_user(&redis, "jetfn", PASSWORD).await.unwrap();
    let port = redis
        .tls_url()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let rediss = format!("rediss://jetfn:{PASSWORD}@127.0.0.1:{port}");
    let function = start_account(account_config(&nats)).await.unwrap();
    let projection_env = |ca: &Path| {
        vec![
            ("NATS_URL", nats.url()),
            ("REDIS_URL", rediss.clone()),
            // The trust store rustls-native-certs reads, as a deployment would set it.
            ("SSL_CERT_FILE", ca.display().to_string()),
            ("RUST_LOG", "trace".to_owned()),
        ]
    };
    let mut projection =
        FunctionProcess::spawn("account-projection", &projection_env(&pki.ca)).unwrap();
    projection
        .wait_for_log("projection function ready", Duration::from_secs(30))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    opens_an_account(&client, "tls-r", "r-1").await;
    // Read back over the plain port as the same ACL user: the TLS writes landed.
    let plain = format!("redis://jetfn:{PASSWORD}@127.0.0.1:{}", redis.port());
    let model = jetfn::readmodel::ReadModel::connect(&plain, "account-balances")
        .await
        .unwrap();
    model.wait_for(1, Duration::from_secs(10)).await.unwrap();
    projection.terminate().unwrap();
    projection.wait(Duration::from_secs(30)).await.unwrap();
    assert!(
        !projection.log().contains(PASSWORD),
        "the Redis password leaked into the trace log"
    );

    let mut refused =
        FunctionProcess::spawn("account-projection", &projection_env(&pki.other_ca)).unwrap();
    let status = refused.wait(Duration::from_secs(30)).await.unwrap();
    let log = refused.log();
    let error = log
        .lines()
        .rfind(|line| line.to_lowercase().contains("redis"))
        .unwrap_or_default()
        .to_owned();
    println!("rediss with a wrong CA: {error}");
    assert!(!status.success(), "{log}");
    assert!(error.to_lowercase().contains("certificate"), "{log}");
    assert!(!log.contains(PASSWORD), "the Redis password leaked");
    function.stop().await.unwrap();
}

/// At start a projection tries every command its apply step runs, as its Redis user: a user
/// refused one (here `XTRIM`, which trims the change feed) fails the start naming it, instead
/// of a batch failing later. The same user with every command passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_refused_a_command_of_the_apply_step_fails_the_check_naming_it() {
    use jetfn::readmodel::{ReadModel, ReadModelError};
    let redis = RedisServer::start().await.unwrap();
    let mut admin = redis.connect().await.unwrap();
    for (user, rule) in [("everything", "+@all"), ("no-trim", "-xtrim")] {
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", user, "on", ">pw", "~*", "&*", "+@all", rule])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let as_user = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", redis.port());

    let allowed = ReadModel::connect(&as_user("everything"), "account-balances")
        .await
        .unwrap();
    allowed.check_permissions().await.unwrap();

    let refused = ReadModel::connect(&as_user("no-trim"), "account-balances")
        .await
        .unwrap();
    let error = refused.check_permissions().await.unwrap_err();
    assert!(
        matches!(&error, ReadModelError::MissingPermission { command, .. } if command == "XTRIM"),
        "{error}"
    );
}

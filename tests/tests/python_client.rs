//! The Python example client (`examples/python/account_client.py`, written from
//! `docs/protocol.md` alone) against the account function and projection on real servers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::start_account;
use jetfn_tests::readmodels::{projection_config, start_projection};
use jetfn_tests::{NatsServer, RedisServer};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

const INSTALL: &str = "python3 -m pip install -r examples/python/requirements.txt";

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
}

/// Fails with the install command when python3 or its packages are missing.
async fn check_python_packages() {
    let probe = Command::new("python3")
        .args(["-c", "import nats, redis"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("python3 cannot be run ({e}); install Python 3, then {INSTALL}")
        });
    assert!(
        probe.status.success(),
        "the Python client needs nats-py and redis: {INSTALL}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

/// Waits until `$SRV.INFO.<name>` is answered, so the service's subscriptions are in place.
async fn serving(client: &async_nats::Client, name: &str) {
    let started = Instant::now();
    while client
        .request(format!("$SRV.INFO.{name}"), "".into())
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} does not answer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_opens_deposits_handles_a_rejection_and_reads_its_balance() {
    jetfn_tests::init_tracing();
    check_python_packages().await;
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let function = start_account(config.clone()).await.unwrap();
    let projection = start_projection(config).await.unwrap();
    let client = nats.connect().await.unwrap();
    serving(&client, "account").await;
    serving(&client, "account-balances").await;

    let script = examples_dir().join("account_client.py");
    let child = Command::new("python3")
        .arg(&script)
        .env("NATS_URL", nats.url())
        .env("REDIS_URL", redis.url())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("running python3 {}: {e}", script.display()));
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Python client did not finish within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown = format!("--- stdout:\n{stdout}--- stderr:\n{stderr}");
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{shown}",
        output.status
    );
    assert!(
        stdout.contains("withdraw 5000: rejected as expected (code 422): insufficient funds"),
        "the rejection was not handled as expected:\n{shown}"
    );
    assert!(
        stdout.contains("balance in Redis: 1050 (expected 1050)"),
        "no balance check:\n{shown}"
    );
    assert!(stdout.contains("OK:"), "no success line:\n{shown}");

    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

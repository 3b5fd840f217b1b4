//! Tests of the test harness itself, against real servers and processes.

#![allow(clippy::expect_used)]

use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use jetfn_tests::{FunctionProcess, MIN_NATS_SERVER_VERSION, NatsServer, RedisServer, Version};
use nix::sys::signal::kill;
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(10);

fn port_is_closed(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

fn process_is_gone(pid: u32) -> bool {
    // Signal 0 checks existence; the harness reaps its children, so a
    // stopped server leaves no zombie behind either.
    kill(Pid::from_raw(i32::try_from(pid).expect("pid")), None).is_err()
}

async fn set(con: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(con)
        .await
        .expect("SET");
}

async fn get(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(con)
        .await
        .expect("GET")
}

async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream");
}

#[tokio::test]
async fn nats_server_starts_on_a_free_port_with_jetstream_enabled() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.expect("start nats-server");
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    assert_ne!(nats.port(), 4222, "must not use the system NATS port");

    let client = nats.connect().await.expect("connect");
    let info = client.server_info();
    let version = Version::parse(&info.version).expect("server version");
    assert!(
        version >= MIN_NATS_SERVER_VERSION,
        "nats-server {version} is older than {MIN_NATS_SERVER_VERSION}"
    );
    assert_eq!(info.server_name, nats.name());

    let js = jetstream::new(client);
    create_stream(&js, "HARNESS", "harness.>").await;
    let ack = js
        .publish("harness.hello", "hi".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert_eq!(ack.stream, "HARNESS");
    assert_eq!(ack.sequence, 1);
    assert!(nats.log().contains("JetStream"), "log: {}", nats.log());
}

#[tokio::test]
async fn two_nats_servers_get_different_ports() {
    let (a, b) = tokio::join!(NatsServer::start(), NatsServer::start());
    let (a, b) = (a.expect("start a"), b.expect("start b"));
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
    let (ca, cb) = (a.connect().await.expect("a"), b.connect().await.expect("b"));
    assert_eq!(ca.server_info().server_name, a.name());
    assert_eq!(cb.server_info().server_name, b.name());
}

#[tokio::test]
async fn nats_restart_keeps_jetstream_data() {
    let mut nats = NatsServer::start().await.expect("start nats-server");
    let port = nats.port();
    {
        let js = jetstream::new(nats.connect().await.expect("connect"));
        create_stream(&js, "KEEP", "keep.>").await;
        js.publish("keep.me", "still here".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    let old_pid = nats.pid().expect("running");
    nats.restart().await.expect("restart");
    assert_eq!(nats.port(), port, "restart keeps the port");
    assert_ne!(nats.pid(), Some(old_pid), "restart runs a new process");

    let js = jetstream::new(nats.connect().await.expect("reconnect"));
    let mut stream = js.get_stream("KEEP").await.expect("stream survives");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    let message = stream.get_raw_message(1).await.expect("message 1");
    assert_eq!(message.subject.as_str(), "keep.me");
    assert_eq!(&message.payload[..], b"still here");
}

#[tokio::test]
async fn nats_stop_then_restart_brings_the_server_back() {
    let mut nats = NatsServer::start().await.expect("start nats-server");
    let pid = nats.pid().expect("running");
    nats.stop().await.expect("stop");
    assert_eq!(nats.pid(), None);
    assert!(port_is_closed(nats.port()));
    assert!(process_is_gone(pid));
    nats.restart().await.expect("start again");
    nats.connect().await.expect("connect after restart");
}

#[tokio::test]
async fn redis_server_answers_ping_and_restart_empty_forgets_data() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_ne!(redis.port(), 6379, "must not use the system Redis port");

    let mut con = redis.connect().await.expect("connect");
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    set(&mut con, "jetfn:harness", "remember me").await;

    let port = redis.port();
    redis.restart_empty().await.expect("restart_empty");
    assert_eq!(redis.port(), port, "restart_empty keeps the port");

    let mut con = redis.connect().await.expect("reconnect");
    assert_eq!(
        get(&mut con, "jetfn:harness").await,
        None,
        "restart_empty must forget all data"
    );
}

#[tokio::test]
async fn persistent_redis_keeps_its_data_across_a_kill_and_a_restart() {
    let mut redis = RedisServer::builder()
        .persistent()
        .start()
        .await
        .expect("start redis-server");
    let mut con = redis.connect().await.expect("connect");
    set(&mut con, "jetfn:harness", "kept").await;
    let (port, pid) = (redis.port(), redis.pid().expect("running"));

    redis.kill().expect("SIGKILL");
    assert_eq!(redis.pid(), None);
    assert!(process_is_gone(pid));
    redis.restart().await.expect("restart");
    assert_eq!(redis.port(), port, "restart keeps the port");

    let mut con = redis.connect().await.expect("reconnect");
    let value = get(&mut con, "jetfn:harness").await;
    assert_eq!(value.as_deref(), Some("kept"), "{}", redis.log());
}

#[tokio::test]
async fn servers_are_stopped_when_the_harness_is_dropped() {
    let nats = NatsServer::start().await.expect("start nats-server");
    let redis = RedisServer::start().await.expect("start redis-server");
    let (nats_port, nats_pid) = (nats.port(), nats.pid().expect("nats pid"));
    let (redis_port, redis_pid) = (redis.port(), redis.pid().expect("redis pid"));
    let (nats_dir, redis_log) = (nats.store_dir(), redis.log_path());
    assert!(!port_is_closed(nats_port) && !port_is_closed(redis_port));

    drop(nats);
    drop(redis);

    assert!(
        port_is_closed(nats_port),
        "nats port {nats_port} still open"
    );
    assert!(
        port_is_closed(redis_port),
        "redis port {redis_port} still open"
    );
    assert!(
        process_is_gone(nats_pid),
        "nats-server {nats_pid} still alive"
    );
    assert!(
        process_is_gone(redis_pid),
        "redis-server {redis_pid} still alive"
    );
    assert!(!nats_dir.exists(), "temporary JetStream store not removed");
    assert!(!redis_log.exists(), "temporary redis dir not removed");
}

#[test]
fn servers_are_stopped_when_a_test_panics_while_holding_them() {
    let (tx, rx) = std::sync::mpsc::channel();
    let test = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let nats = NatsServer::start().await.expect("start nats-server");
            let redis = RedisServer::start().await.expect("start redis-server");
            tx.send([
                (nats.port(), nats.pid().expect("nats pid")),
                (redis.port(), redis.pid().expect("redis pid")),
            ])
            .expect("send");
            panic!("deliberate panic while holding servers (expected by this test)");
        })
    });
    assert!(test.join().is_err(), "the thread should have panicked");

    for (port, pid) in rx.recv().expect("servers had started") {
        assert!(port_is_closed(port), "port {port} still open after panic");
        assert!(process_is_gone(pid), "server {pid} still alive after panic");
    }
}

#[tokio::test]
async fn function_process_passes_env_and_stops_on_sigterm() {
    let mut sleeper = FunctionProcess::spawn("jetfn-test-sleeper", &[("GREETING", "hej".into())])
        .expect("spawn sleeper");
    assert_eq!(
        FunctionProcess::binary_path("jetfn-test-sleeper").expect("binary path"),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_jetfn-test-sleeper"))
    );
    sleeper
        .wait_for_log("sleeper ready", WAIT)
        .await
        .expect("sleeper starts");
    let log = sleeper.log();
    assert!(log.contains(&format!("pid={}", sleeper.pid())), "{log}");
    assert!(log.contains("greeting=hej"), "{log}");
    assert!(
        log.contains("rust_log=info"),
        "RUST_LOG defaults to info: {log}"
    );
    assert!(
        log.contains("nats_url=<unset>"),
        "NATS_URL is not inherited: {log}"
    );
    sleeper
        .wait_for_log("sleeper stderr works", WAIT)
        .await
        .expect("stderr is logged too");
    assert_eq!(sleeper.try_status().expect("status"), None, "still running");

    sleeper.terminate().expect("SIGTERM");
    let status = sleeper.wait(WAIT).await.expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", sleeper.log());
    assert!(sleeper.log().contains("sleeper got SIGTERM"));
}

#[tokio::test]
async fn function_process_kill_is_a_sigkill_and_rust_log_can_be_overridden() {
    let mut sleeper = FunctionProcess::spawn("jetfn-test-sleeper", &[("RUST_LOG", "debug".into())])
        .expect("spawn sleeper");
    sleeper
        .wait_for_log("sleeper ready", WAIT)
        .await
        .expect("sleeper starts");
    assert!(
        sleeper.log().contains("rust_log=debug"),
        "{}",
        sleeper.log()
    );
    let pid = sleeper.pid();
    let status = sleeper.kill().expect("SIGKILL");
    assert_eq!(status.signal(), Some(9));
    assert!(process_is_gone(pid));
    // Terminating an already reaped process is a no-op, not a stray signal.
    sleeper.terminate().expect("terminate after kill");
}

#[tokio::test]
async fn function_process_wait_times_out_while_it_runs_and_drop_kills_it() {
    let mut sleeper = FunctionProcess::spawn("jetfn-test-sleeper", &[]).expect("spawn sleeper");
    sleeper
        .wait_for_log("sleeper ready", WAIT)
        .await
        .expect("sleeper starts");
    let error = sleeper
        .wait(Duration::from_millis(100))
        .await
        .expect_err("still running");
    assert!(format!("{error:#}").contains("still running"), "{error:#}");
    let pid = sleeper.pid();
    drop(sleeper);
    assert!(process_is_gone(pid));
}

#[test]
fn binary_path_says_how_to_build_a_missing_binary() {
    let error = FunctionProcess::binary_path("no-such-jetfn-function").expect_err("missing");
    assert!(
        format!("{error:#}").contains("cargo build --workspace"),
        "{error:#}"
    );
}

#[test]
fn nats_server_binary_is_recent_enough() {
    let path = jetfn_tests::nats_server_binary().expect("a nats-server >= 2.12");
    let output = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .expect("run --version");
    let version = Version::parse(&String::from_utf8_lossy(&output.stdout)).expect("version");
    assert!(
        version >= MIN_NATS_SERVER_VERSION,
        "{}: {version}",
        path.display()
    );
    // Cached: the same answer again.
    assert_eq!(jetfn_tests::nats_server_binary().expect("cached"), path);
}

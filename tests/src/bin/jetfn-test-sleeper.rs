//! A tiny long-running process for the harness's own tests of
//! `FunctionProcess`: it reports its environment, then waits for SIGTERM and
//! exits 0.

use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| "<unset>".to_owned());
    println!(
        "sleeper ready pid={} greeting={} rust_log={} nats_url={}",
        std::process::id(),
        var("GREETING"),
        var("RUST_LOG"),
        var("NATS_URL"),
    );
    eprintln!("sleeper stderr works");
    terminate.recv().await;
    println!("sleeper got SIGTERM");
    Ok(())
}

//! Liveness and readiness over a small HTTP port, for Kubernetes probes and load balancers.
//!
//! With `health.port` set, a function answers `GET /livez` (200 while its event loop runs) and
//! `GET /readyz` (200 once it is connected to NATS and serving: for a command function, the
//! stream is provisioned and the service registered; for a projection, every partition has bound
//! its consumer). Anything else is 404; not ready or not live is 503.

use crate::Error;
use crate::config::HealthConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How stale the event loop's heartbeat may be before `/livez` fails.
const LIVENESS_WINDOW_MS: u64 = 10_000;

type ReadyCheck = Box<dyn Fn() -> bool + Send + Sync>;

/// The health endpoint of one function; aborts its tasks when dropped.
#[derive(Debug)]
pub(crate) struct HealthServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the endpoint if `health.port` is set. `ready` says whether the function serves.
pub(crate) async fn serve(
    config: &HealthConfig,
    client: async_nats::Client,
    ready: impl Fn() -> bool + Send + Sync + 'static,
) -> Result<Option<HealthServer>, Error> {
    let Some(port) = config.port else {
        return Ok(None);
    };
    let address = format!("{}:{port}", config.address);
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|e| Error::Service(format!("health.port: cannot listen on {address}: {e}")))?;
    let heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let beat = heartbeat.clone();
    let ticker = tokio::spawn(async move {
        loop {
            beat.store(now_ms(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let ready: Arc<ReadyCheck> = Arc::new(Box::new(move || {
        ready() && client.connection_state() == async_nats::connection::State::Connected
    }));
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (heartbeat, ready) = (heartbeat.clone(), ready.clone());
            tokio::spawn(async move {
                let live =
                    now_ms().saturating_sub(heartbeat.load(Ordering::Relaxed)) < LIVENESS_WINDOW_MS;
                let _ = answer(stream, live, &ready).await;
            });
        }
    });
    tracing::info!(%address, "health endpoint: /livez, /readyz");
    Ok(Some(HealthServer {
        tasks: vec![ticker, server],
    }))
}

async fn answer(mut stream: TcpStream, live: bool, ready: &ReadyCheck) -> std::io::Result<()> {
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
        .await
        .unwrap_or(Ok(0))?;
    let request = String::from_utf8_lossy(&buffer[..read]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/livez" if live => ("200 OK", "live"),
        "/livez" => ("503 Service Unavailable", "event loop stalled"),
        "/readyz" if live && ready() => ("200 OK", "ready"),
        "/readyz" => ("503 Service Unavailable", "not ready"),
        _ => ("404 Not Found", "try /livez or /readyz"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

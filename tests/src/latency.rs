//! A slow link to a server on loopback: a TCP relay that hands on everything the server sends
//! only after a fixed delay, in order, as a distant server would look to a client. What the
//! client sends passes at once.

use anyhow::{Context, Result};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A relay on a free loopback port to `127.0.0.1:<port>`; stopped (with every connection
/// through it) when dropped.
pub struct SlowLink {
    port: u16,
    relays: JoinSet<()>,
}

impl SlowLink {
    /// Relays to the server on loopback port `port`, delaying its bytes by `delay`.
    pub async fn start(port: u16, delay: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the slow link")?;
        let own = listener.local_addr()?.port();
        let mut relays = JoinSet::new();
        relays.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay(client, port, delay));
            }
        });
        Ok(SlowLink { port: own, relays })
    }

    /// The URL a NATS client connects to through the link.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.relays.abort_all();
    }
}

/// One connection: client bytes straight on; server bytes each `delay` after they came.
async fn relay(client: TcpStream, port: u16, delay: Duration) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let upstream = async move {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
    };
    let receive = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(read) = from_server.read(&mut buffer).await {
            if read == 0
                || held
                    .send((Instant::now(), buffer[..read].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let deliver = async move {
        while let Some((came, bytes)) = due.recv().await {
            tokio::time::sleep_until(came + delay).await;
            if to_client.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    // Either direction ending ends the connection, as a dropped link would.
    tokio::select! {
        _ = upstream => {}
        _ = async { tokio::join!(receive, deliver) } => {}
    }
}

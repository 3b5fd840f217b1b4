//! Several `nats-server`s at once: a JetStream cluster on loopback, and the port rewriting that
//! runs the configurations of `deploy/nats/` on free ports.

use crate::process::free_port;
use crate::server::{Builder, Nats, NatsServer};
use crate::{Error, Result};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a new cluster may take until its meta leader can place a stream on every node.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The stream [`NatsCluster::start`] creates and deletes to see that placement works.
const PLACEMENT_PROBE: &str = "JETFN_DEVTOOLS_PLACEMENT_PROBE";

/// `text` with every `127.0.0.1:<from>` turned into `127.0.0.1:<to>`, for each `(from, to)`:
/// a configuration written for fixed ports (`deploy/nats/`) run on free ones. Ports are matched
/// whole (`:4231` does not match `:42310`).
pub fn rewrite_ports(text: &str, ports: &[(u16, u16)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in ports {
        let needle = format!("127.0.0.1:{from}");
        let mut rewritten = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(&needle) {
            let end = at + needle.len();
            let whole = !rest[end..].starts_with(|c: char| c.is_ascii_digit());
            rewritten.push_str(&rest[..at]);
            if whole {
                rewritten.push_str(&format!("127.0.0.1:{to}"));
            } else {
                rewritten.push_str(&needle);
            }
            rest = &rest[end..];
        }
        rewritten.push_str(rest);
        out = rewritten;
    }
    out
}

/// Free loopback ports, `count` of them, for routes, leaf node and monitoring listeners that a
/// configuration names before its server starts.
pub fn free_ports(count: usize) -> Result<Vec<u16>> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    while ports.len() < count {
        let port = free_port()?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// The nodes of one JetStream cluster, each a [`NatsServer`] of its own (kill, restart and logs
/// per node).
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts one node per builder, all at once: a clustered JetStream answers only once a meta
    /// leader is elected, so no node is ready before enough of the others run. Each builder
    /// carries its node's configuration (cluster name, route listener and routes).
    pub async fn start(builders: Vec<Builder<Nats>>) -> Result<NatsCluster> {
        let count = builders.len();
        let mut starting = JoinSet::new();
        for (index, builder) in builders.into_iter().enumerate() {
            starting.spawn(async move { (index, builder.start().await) });
        }
        let mut nodes: Vec<Option<NatsServer>> = (0..count).map(|_| None).collect();
        let mut first_error = None;
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((index, Ok(node))) => nodes[index] = Some(node),
                Ok((index, Err(e))) => {
                    first_error.get_or_insert(Error::Start(format!("cluster node {index}: {e}")));
                }
                Err(e) => {
                    first_error.get_or_insert(Error::Start(format!("starting a node: {e}")));
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let cluster = NatsCluster {
            nodes: nodes.into_iter().flatten().collect(),
        };
        cluster.wait_for_placement().await?;
        Ok(cluster)
    }

    /// Waits until a stream replicated on every node can be created. A node answers JetStream
    /// as soon as a meta leader is elected, but the leader learns of its peers a moment later,
    /// and until then an R3 stream is refused with "no suitable peers for placement".
    async fn wait_for_placement(&self) -> Result<()> {
        use async_nats::jetstream::stream;
        let js = async_nats::jetstream::new(self.connect().await?);
        let probe = stream::Config {
            name: PLACEMENT_PROBE.to_owned(),
            subjects: vec!["jetfn.devtools.placement.probe".to_owned()],
            num_replicas: self.nodes.len(),
            storage: stream::StorageType::Memory,
            ..Default::default()
        };
        let deadline = Instant::now() + PLACEMENT_TIMEOUT;
        loop {
            match js.create_stream(probe.clone()).await {
                Ok(_) => {
                    js.delete_stream(PLACEMENT_PROBE).await.map_err(|e| {
                        Error::Start(format!("deleting the placement probe stream: {e}"))
                    })?;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Start(format!(
                        "the cluster could not place an R{} stream within {PLACEMENT_TIMEOUT:?}: {e}",
                        self.nodes.len()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Every node's URL, comma separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes, in the order of the builders.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `index`, to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> Option<&mut NatsServer> {
        self.nodes.get_mut(index)
    }

    /// The index of the node named `name` (`--server_name`, as JetStream reports leaders).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name() == name)
    }

    /// Connects a client to every node's URL.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let urls = self.urls();
        let addresses = self
            .nodes
            .iter()
            .map(|node| node.url().parse::<async_nats::ServerAddr>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Connect(format!("cluster URLs {urls}: {e}")))?;
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addresses)
            .await
            .map_err(|e| Error::Connect(format!("connecting to the cluster at {urls}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_rewritten_whole() {
        let text = "listen: 127.0.0.1:4231\nroutes: [127.0.0.1:6232, 127.0.0.1:62320]";
        assert_eq!(
            rewrite_ports(text, &[(4231, 5000), (6232, 6000)]),
            "listen: 127.0.0.1:5000\nroutes: [127.0.0.1:6000, 127.0.0.1:62320]"
        );
    }
}

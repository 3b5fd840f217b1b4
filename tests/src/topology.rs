//! The deployments of `deploy/nats/` on loopback: an edge leaf node on its hub
//! (`leaf.conf`), and the 3-node cluster (`cluster/node-{1,2,3}.conf`), each run from the
//! very files a user deploys, with their fixed ports moved to free ones.

use crate::{NatsCluster, NatsServer, free_ports, rewrite_ports};
use anyhow::{Context, Result};
use std::path::Path;

/// The JetStream domain of the hub (`deploy/nats/cluster/`), which leaf nodes name.
pub const HUB_DOMAIN: &str = "hub";

/// The leaf node port of the cluster's nodes in `deploy/nats/`, which `leaf.conf` dials.
const HUB_LEAF_PORTS: [u16; 3] = [7431, 7432, 7433];
/// The route ports of the cluster's nodes.
const ROUTE_PORTS: [u16; 3] = [6231, 6232, 6233];
/// The monitoring ports of the cluster's nodes.
const MONITOR_PORTS: [u16; 3] = [8231, 8232, 8233];
/// The monitoring port of `leaf.conf`.
const LEAF_MONITOR_PORT: u16 = 8241;

/// The text of `deploy/nats/<file>`.
pub fn deploy_nats_config(file: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/nats")
        .join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The passwords tests give the users of `deploy/nats/permissions.conf`.
pub mod passwords {
    /// The account command function's user, `account`.
    pub const ACCOUNT: &str = "account-pw-1";
    /// The bank decision function's user, `bank`.
    pub const BANK: &str = "bank-pw-6";
    /// The signup decision function's user, `signup`.
    pub const SIGNUP: &str = "signup-pw-7";
    /// The projection's user, `account-balances`.
    pub const PROJECTION: &str = "balances-pw-2";
    /// The client's user, `jetfn-client`.
    pub const CLIENT: &str = "client-pw-3";
    /// The operations user, `jetfn-deploy`.
    pub const DEPLOY: &str = "deploy-pw-4";
}

/// `deploy/nats/permissions.conf` with its password variables defined in front of it
/// ([`passwords`]).
pub fn deploy_permissions() -> Result<String> {
    let permissions = deploy_nats_config("permissions.conf")?;
    Ok(format!(
        "JETFN_ACCOUNT_PASSWORD: \"{}\"\n\
         JETFN_BANK_PASSWORD: \"{}\"\n\
         JETFN_SIGNUP_PASSWORD: \"{}\"\n\
         JETFN_ACCOUNT_BALANCES_PASSWORD: \"{}\"\n\
         JETFN_CLIENT_PASSWORD: \"{}\"\n\
         JETFN_DEPLOY_PASSWORD: \"{}\"\n\
         {permissions}",
        passwords::ACCOUNT,
        passwords::BANK,
        passwords::SIGNUP,
        passwords::PROJECTION,
        passwords::CLIENT,
        passwords::DEPLOY,
    ))
}

/// [`deploy_permissions`] without every line that is exactly `line` (trimmed), and how many
/// lines that removed.
pub fn deploy_permissions_without(line: &str) -> Result<(String, usize)> {
    let full = deploy_permissions()?;
    let kept: Vec<&str> = full.lines().filter(|l| l.trim() != line).collect();
    let removed = full.lines().count() - kept.len();
    Ok((kept.iter().map(|l| format!("{l}\n")).collect(), removed))
}

/// A client of `nats` logged in as `user` of `deploy/nats/permissions.conf`, with the inbox
/// prefix that file grants each user (`_INBOX.<user>`).
pub async fn login(nats: &NatsServer, user: &str, password: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .connect(nats.url())
        .await
        .with_context(|| format!("logging in to {} as {user}", nats.url()))
}

/// A hub and an edge leaf node connected to it.
#[derive(Debug)]
pub struct Edge {
    /// The hub: one nats-server with JetStream in domain [`HUB_DOMAIN`], accepting leaf nodes.
    pub hub: NatsServer,
    /// The leaf: `deploy/nats/leaf.conf`, no JetStream, its remote aimed at the hub.
    pub leaf: NatsServer,
    /// The user and password a client at the leaf logs in with to check the leaf connection.
    leaf_login: Option<(String, String)>,
}

impl Edge {
    /// Starts the hub, then the leaf, and waits until the leaf connection is up.
    pub async fn start() -> Result<Edge> {
        Self::start_with_leaf_config("", None).await
    }

    /// Like [`Edge::start`], with `extra` appended to the leaf's configuration (its users, say);
    /// the leaf's readiness probe and the leaf-connection check then log in as `login`, a user
    /// that may publish and subscribe anything.
    pub async fn start_with_leaf_config(extra: &str, login: Option<(&str, &str)>) -> Result<Edge> {
        let ports = free_ports(2)?;
        let (hub_leaf_port, leaf_monitor_port) = (ports[0], ports[1]);
        // The hub of deploy/nats/cluster/ as one node: its domain and its leaf node listener.
        let hub = NatsServer::builder()
            .config(format!(
                "jetstream {{ domain: {HUB_DOMAIN} }}\nleafnodes {{ listen: 127.0.0.1:{hub_leaf_port} }}\n"
            ))
            .start()
            .await?;
        let mut moved: Vec<(u16, u16)> = HUB_LEAF_PORTS.map(|p| (p, hub_leaf_port)).into();
        moved.push((LEAF_MONITOR_PORT, leaf_monitor_port));
        let leaf_config = rewrite_ports(&deploy_nats_config("leaf.conf")?, &moved);
        let mut leaf = NatsServer::builder()
            .config(format!("{leaf_config}\n{extra}"))
            .without_jetstream();
        if let Some((user, password)) = login {
            leaf = leaf.login(user, password);
        }
        let leaf = leaf.start().await?;
        let leaf_login = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let edge = Edge {
            hub,
            leaf,
            leaf_login,
        };
        edge.wait_for_leaf_connection().await?;
        Ok(edge)
    }

    /// Waits (at most 20 s) until a subscription on the hub is seen from the leaf: the leaf
    /// connection is up and carries interest.
    pub async fn wait_for_leaf_connection(&self) -> Result<()> {
        let hub = self.hub.connect().await?;
        let leaf = match &self.leaf_login {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
                    .connect(self.leaf.url())
                    .await?
            }
            None => self.leaf.connect().await?,
        };
        let subject = format!("jetfn.test.edge.{}", uuid::Uuid::new_v4().simple());
        let mut responder = hub.subscribe(subject.clone()).await?;
        hub.flush().await?;
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(message) = responder.next().await {
                if let Some(reply) = message.reply {
                    let _ = hub.publish(reply, "pong".into()).await;
                }
            }
        });
        crate::workload::poll(
            "the leaf connection",
            std::time::Duration::from_secs(20),
            || {
                let (leaf, subject) = (leaf.clone(), subject.clone());
                async move { Ok(leaf.request(subject, "ping".into()).await.ok().map(|_| ())) }
            },
        )
        .await
    }
}

/// Starts the 3-node cluster of `deploy/nats/cluster/` on free ports (client, route, leaf node
/// and monitoring ports all moved, the store in a temporary directory), every node at once.
pub async fn start_cluster() -> Result<NatsCluster> {
    let ports = free_ports(9)?;
    let mut moved: Vec<(u16, u16)> = Vec::new();
    for node in 0..3 {
        moved.push((ROUTE_PORTS[node], ports[node]));
        moved.push((HUB_LEAF_PORTS[node], ports[3 + node]));
        moved.push((MONITOR_PORTS[node], ports[6 + node]));
    }
    let mut builders = Vec::new();
    for node in 1..=3 {
        let text = deploy_nats_config(&format!("cluster/node-{node}.conf"))?;
        // The store is the harness's (`-sd`, a temporary directory): nats-server refuses a
        // second `store_dir`.
        let text: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("store_dir:"))
            .map(|line| format!("{line}\n"))
            .collect();
        builders.push(NatsServer::builder().config(rewrite_ports(&text, &moved)));
    }
    Ok(NatsCluster::start(builders).await?)
}

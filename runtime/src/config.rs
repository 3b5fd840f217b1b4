//! Configuration: `jetfn.toml`, then `JETFN_*` environment variables, then `NATS_URL` and
//! `REDIS_URL`.
//!
//! Every setting has a default, so an empty environment runs against `nats://127.0.0.1:4222`.
//! Nested keys map to environment variables with `__` between levels:
//! `command.max_retries` is `JETFN_COMMAND__MAX_RETRIES`. The file is `jetfn.toml` in the
//! working directory, or the path in `JETFN_CONFIG`.
//!
//! ```toml
//! [nats]
//! url = "nats://127.0.0.1:4222"
//! creds_file = "/etc/jetfn/account.creds"
//!
//! [command]
//! max_retries = 100
//!
//! [stream]
//! duplicate_window = "2m"
//!
//! [ledger]
//! ttl = "7days"
//!
//! [redis]
//! url = "redis://127.0.0.1:6379"
//!
//! [projection]
//! partitions = 4
//! ```
//!
//! Unknown keys and bad values fail at start with a message that names the key.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type; figment names the key.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value has the right type but is not allowed.
    #[error("configuration: {key}: {message}")]
    Invalid {
        /// The dotted key, for example `command.max_in_flight`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration of a function.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// How commands are received and retried.
    pub command: CommandConfig,
    /// The event stream.
    pub stream: StreamConfig,
    /// The idempotency ledger.
    pub ledger: LedgerConfig,
    /// How to reach Redis (projections).
    pub redis: RedisConfig,
    /// How projections consume and apply events.
    pub projection: ProjectionConfig,
    /// The optional liveness/readiness HTTP endpoint.
    pub health: HealthConfig,
}

/// The liveness/readiness HTTP endpoint (`GET /livez`, `GET /readyz`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// The port; no endpoint when absent.
    pub port: Option<u16>,
    /// The address to listen on.
    pub address: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            port: None,
            address: "0.0.0.0".into(),
        }
    }
}

/// Redis connection settings.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS. `REDIS_URL` overrides it.
    pub url: Secret,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: Secret::new("redis://127.0.0.1:6379"),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(self.url.expose()))
            .finish()
    }
}

/// How projections consume and apply events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectionConfig {
    /// Partitions: each has its own consumer and checkpoint; events of one aggregate always go to
    /// the same partition, so per-aggregate order holds while instances share the work.
    pub partitions: u32,
    /// The most events applied in one atomic Redis step.
    pub batch: usize,
    /// Attempts at an event the projection cannot decode or refuses, before it is dead-lettered.
    pub max_attempts: u32,
    /// How long JetStream waits for an ack before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a partition stays with an instance that stopped pulling before another takes it.
    #[serde(with = "humantime_serde")]
    pub pin_timeout: Duration,
    /// Entries kept in the change feed stream (approximately).
    pub change_feed_len: u64,
    /// How long a replaced read-model version stays readable after a rebuild flips the pointer.
    #[serde(with = "humantime_serde")]
    pub rebuild_grace: Duration,
    /// The dead-letter stream (shared by all projections; subjects `jetfn.dlq.<projection>`).
    pub dead_letter_stream: String,
    /// Fault injection for tests (feature `fault-injection` only): exit the process with status
    /// 86 right after this many Redis commits, before acknowledging them.
    #[cfg(feature = "fault-injection")]
    pub crash_after_commits: Option<u64>,
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        ProjectionConfig {
            partitions: 1,
            batch: 500,
            max_attempts: 3,
            ack_wait: Duration::from_secs(30),
            pin_timeout: Duration::from_secs(5),
            change_feed_len: 10_000,
            rebuild_grace: Duration::from_secs(5),
            dead_letter_stream: "JETFN_DLQ".into(),
            #[cfg(feature = "fault-injection")]
            crash_after_commits: None,
        }
    }
}

/// Connection and authentication settings for NATS.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. `NATS_URL` overrides it.
    pub url: String,
    /// Connection name shown in server monitoring. Defaults to `jetfn-<aggregate>`.
    pub name: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// A file holding an nkey seed (`SU...`, surrounding whitespace ignored), read at connect:
    /// the seed stays out of the environment and the configuration. Not with `nkey_seed`.
    pub nkey_seed_file: Option<PathBuf>,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// Password for user/password authentication.
    pub password: Option<Secret>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// A PEM file of CA certificates to trust.
    pub tls_ca: Option<PathBuf>,
    /// A PEM client certificate; needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The PEM key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
    /// How long to wait for the first connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for a JetStream reply before a command fails as `unavailable`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The prefix of this connection's reply subjects (its own requests' inboxes). Give each
    /// NATS user its own (`_INBOX.account`, say) so permissions can keep users off each other's
    /// replies.
    pub inbox_prefix: String,
    /// Reply subjects the function answers, for every request it serves (commands, `$SRV`
    /// discovery, control endpoints): a request whose reply subject is not under one of these
    /// prefixes is dropped unprocessed, so no client can aim an answer at an event subject or a
    /// control endpoint.
    pub reply_prefixes: Vec<String>,
    /// The JetStream domain to talk to (`hub`): every JetStream request goes to
    /// `$JS.<domain>.API`, as a function on a leaf node needs to reach the hub's JetStream.
    /// Not together with `jetstream_api_prefix`.
    pub jetstream_domain: Option<String>,
    /// The JetStream API prefix itself, for an account that imports another's JetStream under a
    /// prefix of its own. `$JS.API` when neither this nor `jetstream_domain` is set.
    pub jetstream_api_prefix: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: None,
            creds_file: None,
            nkey_seed: None,
            nkey_seed_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            inbox_prefix: "_INBOX".into(),
            reply_prefixes: vec!["_INBOX".into()],
            jetstream_domain: None,
            jetstream_api_prefix: None,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets print as <redacted> through `Secret`'s Debug.
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &self.nkey_seed)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("reply_prefixes", &self.reply_prefixes)
            .field("jetstream_domain", &self.jetstream_domain)
            .field("jetstream_api_prefix", &self.jetstream_api_prefix)
            .finish_non_exhaustive()
    }
}

/// How commands are received, processed and retried.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CommandConfig {
    /// Optional subject prefix: commands arrive on `<prefix>.cmd.<aggregate>.<id>.<command>`.
    pub subject_prefix: Option<String>,
    /// The queue group instances share. `q` is the NATS services default.
    pub queue_group: String,
    /// Retries after an optimistic-concurrency conflict before replying `conflict`.
    pub max_retries: u32,
    /// How long a command may keep retrying conflicts before replying `conflict`, however many
    /// retries are left. Every conflict means another command succeeded, so on a busy aggregate
    /// retries make progress; this bounds how long one command waits for its turn.
    #[serde(with = "humantime_serde")]
    pub conflict_budget: Duration,
    /// The first backoff step between conflict retries; it doubles per retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// The largest backoff step.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
    /// Commands processed concurrently by one instance (deciding and appending).
    pub max_in_flight: usize,
    /// Commands an instance holds at once, processing or waiting for their aggregate; more are
    /// answered `unavailable` at once.
    pub max_pending: usize,
    /// The largest accepted command body in bytes.
    pub max_body_bytes: usize,
    /// Aggregates whose folded state an instance keeps (least recently used are dropped).
    /// 0 keeps none: every command loads its aggregate.
    pub cache_entries: usize,
    /// Recent command ids remembered per cached aggregate, answered without a ledger read.
    pub recent_commands: usize,
    /// Commands that may wait for one aggregate; more are answered `unavailable`, so one busy
    /// aggregate cannot hold up the others.
    pub max_queued_per_aggregate: usize,
    /// For aggregates that opt in to snapshots: write one every this many events.
    pub snapshot_every: u64,
    /// Aggregate affinity: the instances of the function tell each other apart, and each
    /// aggregate's commands are served by one of them (handed on when they arrive at another).
    /// Only the speed depends on it; turn it off when NATS may not carry
    /// `jetfn.affinity.<aggregate>.>` between the instances.
    pub affinity: bool,
}

impl Default for CommandConfig {
    fn default() -> Self {
        CommandConfig {
            subject_prefix: None,
            queue_group: crate::wire::names::QUEUE_GROUP.into(),
            max_retries: 100,
            conflict_budget: Duration::from_secs(2),
            retry_backoff: Duration::from_millis(2),
            max_retry_backoff: Duration::from_millis(200),
            max_in_flight: 256,
            max_pending: 16 * 1024,
            max_body_bytes: 64 * 1024,
            cache_entries: 100_000,
            recent_commands: 16,
            max_queued_per_aggregate: 1024,
            snapshot_every: 100,
            affinity: true,
        }
    }
}

/// The aggregate's event stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name. Defaults to the upper-cased aggregate name plus `_EVENTS`.
    pub name: Option<String>,
    /// Subject prefix of events: an aggregate's events go to `<subject_prefix>.<id>`.
    /// Defaults to `evt.<aggregate>`.
    pub subject_prefix: Option<String>,
    /// Replicas (1 for a single server, 3 for a production cluster) of the event stream, the
    /// snapshot bucket, and the dead-letter stream when a projection creates it.
    pub replicas: usize,
    /// How long JetStream remembers `Nats-Msg-Id`s. Older repeats are caught by the ledger.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// The stream's size limit in bytes; new events are refused beyond it (never old ones
    /// dropped). Unlimited when absent.
    pub max_bytes: Option<i64>,
    /// Create or update the stream at start-up. Turn off when `deploy/` provisions it.
    pub provision: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: None,
            subject_prefix: None,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: None,
            provision: true,
        }
    }
}

/// The command ledger: replies by command id, kept longer than the duplicate window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// KV bucket name. Defaults to `jetfn-ledger-<aggregate>`.
    pub bucket: Option<String>,
    /// How long a reply is remembered.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Replicas of the bucket.
    pub replicas: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            bucket: None,
            ttl: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// `given` validated, or, without one, [`Config::load`]: what a function builder's
    /// `with_config` chooses between.
    pub fn given_or_load(given: Option<Config>) -> Result<Config, ConfigError> {
        match given {
            Some(config) => {
                config.validate()?;
                Ok(config)
            }
            None => Config::load(),
        }
    }

    /// Loads `jetfn.toml` (or `$JETFN_CONFIG`), then `JETFN_*` variables, then `NATS_URL`,
    /// and validates the result.
    pub fn load() -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment())
    }

    /// The layered sources [`Config::load`] reads, for callers that add their own.
    pub fn figment() -> Figment {
        let file = std::env::var_os("JETFN_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("jetfn.toml"));
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            // Only nested keys (`JETFN_SECTION__KEY`) are settings; other JETFN_ variables
            // (JETFN_CONFIG, tool paths) are not.
            .merge(
                Env::prefixed("JETFN_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .merge(Env::raw().only(&["NATS_URL"]).map(|_| "nats.url".into()))
            .merge(Env::raw().only(&["REDIS_URL"]).map(|_| "redis.url".into()))
    }

    /// Extracts and validates a configuration from any figment.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that have the right type but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.nats.url.trim().is_empty() {
            return invalid("nats.url", "must not be empty");
        }
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return invalid("nats.tls_cert", "tls_cert and tls_key must be set together");
        }
        if self.nats.nkey_seed.is_some() && self.nats.nkey_seed_file.is_some() {
            return invalid(
                "nats.nkey_seed_file",
                "set either nats.nkey_seed or nats.nkey_seed_file, not both",
            );
        }
        if self.nats.password.is_some() && self.nats.user.is_none() {
            return invalid("nats.user", "must be set when nats.password is");
        }
        if let Some(prefix) = &self.command.subject_prefix
            && !is_subject_prefix(prefix)
        {
            return invalid(
                "command.subject_prefix",
                "must be dot-separated tokens without spaces, `*` or `>`",
            );
        }
        if self.command.queue_group.is_empty() || !is_subject_prefix(&self.command.queue_group) {
            return invalid("command.queue_group", "must be a non-empty subject token");
        }
        if self.command.max_retries > 1000 {
            return invalid("command.max_retries", "must be at most 1000");
        }
        if self.command.max_in_flight == 0 {
            return invalid("command.max_in_flight", "must be at least 1");
        }
        if self.command.max_body_bytes == 0 {
            return invalid("command.max_body_bytes", "must be at least 1");
        }
        if !is_subject_prefix(&self.nats.inbox_prefix) {
            return invalid(
                "nats.inbox_prefix",
                "must be dot-separated tokens without spaces, `*` or `>`",
            );
        }
        if let Some(domain) = &self.nats.jetstream_domain
            && !is_name(domain)
        {
            return invalid("nats.jetstream_domain", "must match [A-Za-z0-9_-]+");
        }
        if let Some(prefix) = &self.nats.jetstream_api_prefix
            && !is_subject_prefix(prefix)
        {
            return invalid(
                "nats.jetstream_api_prefix",
                "must be dot-separated tokens without spaces, `*` or `>`",
            );
        }
        if self.nats.jetstream_domain.is_some() && self.nats.jetstream_api_prefix.is_some() {
            return invalid(
                "nats.jetstream_api_prefix",
                "set either nats.jetstream_domain or nats.jetstream_api_prefix, not both",
            );
        }
        if self.nats.reply_prefixes.is_empty()
            || !self
                .nats
                .reply_prefixes
                .iter()
                .all(|p| is_subject_prefix(p))
        {
            return invalid(
                "nats.reply_prefixes",
                "must list at least one subject prefix without spaces, `*` or `>`",
            );
        }
        if self.command.max_pending == 0 {
            return invalid("command.max_pending", "must be at least 1");
        }
        if self.command.max_queued_per_aggregate == 0 {
            return invalid("command.max_queued_per_aggregate", "must be at least 1");
        }
        if self.command.snapshot_every == 0 {
            return invalid("command.snapshot_every", "must be at least 1");
        }
        if let Some(name) = &self.stream.name
            && !is_name(name)
        {
            return invalid("stream.name", "must match [A-Za-z0-9_-]+");
        }
        if let Some(prefix) = &self.stream.subject_prefix
            && !is_subject_prefix(prefix)
        {
            return invalid(
                "stream.subject_prefix",
                "must be dot-separated tokens without spaces, `*` or `>`",
            );
        }
        if !(1..=5).contains(&self.stream.replicas) {
            return invalid("stream.replicas", "must be between 1 and 5");
        }
        if self.stream.duplicate_window.is_zero() {
            return invalid("stream.duplicate_window", "must be longer than 0s");
        }
        if self.stream.max_bytes.is_some_and(|b| b <= 0) {
            return invalid(
                "stream.max_bytes",
                "must be positive (omit it for no limit)",
            );
        }
        if let Some(bucket) = &self.ledger.bucket
            && !is_name(bucket)
        {
            return invalid("ledger.bucket", "must match [A-Za-z0-9_-]+");
        }
        if self.ledger.ttl < self.stream.duplicate_window {
            return invalid(
                "ledger.ttl",
                "must be at least stream.duplicate_window, or repeats could apply twice",
            );
        }
        if !(1..=5).contains(&self.ledger.replicas) {
            return invalid("ledger.replicas", "must be between 1 and 5");
        }
        if self.redis.url.expose().trim().is_empty() {
            return invalid("redis.url", "must not be empty");
        }
        if !(1..=1024).contains(&self.projection.partitions) {
            return invalid("projection.partitions", "must be between 1 and 1024");
        }
        if !(1..=10_000).contains(&self.projection.batch) {
            return invalid("projection.batch", "must be between 1 and 10000");
        }
        if self.projection.max_attempts == 0 {
            return invalid("projection.max_attempts", "must be at least 1");
        }
        if self.projection.ack_wait < Duration::from_secs(1) {
            return invalid("projection.ack_wait", "must be at least 1s");
        }
        if self.projection.pin_timeout < Duration::from_secs(1) {
            return invalid("projection.pin_timeout", "must be at least 1s");
        }
        if !is_name(&self.projection.dead_letter_stream) {
            return invalid("projection.dead_letter_stream", "must match [A-Za-z0-9_-]+");
        }
        Ok(())
    }
}

impl NatsConfig {
    /// Connects with these settings. `default_name` names the connection unless `name` is set.
    pub async fn connect(&self, default_name: &str) -> Result<async_nats::Client, crate::Error> {
        let mut options = match &self.creds_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    self.connect_error(format!("nats.creds_file {}: {e}", path.display()))
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.expose().to_owned());
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = tokio::fs::read_to_string(path).await.map_err(|e| {
                self.connect_error(format!("nats.nkey_seed_file {}: {e}", path.display()))
            })?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let name = self.name.clone().unwrap_or_else(|| default_name.to_owned());
        let urls: Vec<&str> = self.url.split(',').map(str::trim).collect();
        let addrs = urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.connect_error(format!("nats.url is not a server URL: {e}")))?;
        options
            .custom_inbox_prefix(self.inbox_prefix.clone())
            .event_callback(|event| async move {
                match &event {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(message))
                        if crate::permissions::report(message) => {}
                    async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_) => {
                        tracing::warn!("nats: {event}")
                    }
                    _ => tracing::debug!("nats: {event}"),
                }
            })
            .name(name)
            .require_tls(self.tls_required)
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.request_timeout))
            .connect(addrs)
            .await
            .map_err(|e| self.connect_error(self.describe(&e)))
    }

    /// Why a connection failed, for people: a failed TLS handshake (which async-nats reports as
    /// an I/O error with the TLS library's words) is called one, with the files it used.
    fn describe(&self, error: &async_nats::ConnectError) -> String {
        let reason = error.to_string();
        let lower = reason.to_lowercase();
        let tls = matches!(error.kind(), async_nats::ConnectErrorKind::Tls)
            || ["certificate", "tls", "handshake", "alert"]
                .iter()
                .any(|word| lower.contains(word));
        if !tls {
            return reason;
        }
        let shown = |path: &Option<PathBuf>| {
            path.as_ref()
                .map_or("none".to_owned(), |p| p.display().to_string())
        };
        format!(
            "TLS handshake failed (nats.tls_ca: {}, nats.tls_cert: {}): {reason}",
            shown(&self.tls_ca),
            shown(&self.tls_cert)
        )
    }

    /// The prefix of every JetStream API subject: `$JS.<domain>.API` with `jetstream_domain`,
    /// `jetstream_api_prefix` when set, else `$JS.API`.
    pub fn jetstream_api(&self) -> String {
        match (&self.jetstream_domain, &self.jetstream_api_prefix) {
            (Some(domain), _) => crate::wire::names::domain_api(domain),
            (None, Some(prefix)) => prefix.clone(),
            (None, None) => crate::wire::names::JETSTREAM_API.to_owned(),
        }
    }

    /// The JetStream context every part of the runtime uses on `client`: the API prefix of
    /// [`NatsConfig::jetstream_api`], requests bounded by the connection's `request_timeout`.
    pub fn jetstream(&self, client: async_nats::Client) -> async_nats::jetstream::Context {
        crate::wire::jetstream::context(client, &self.jetstream_api())
    }

    fn connect_error(&self, reason: String) -> crate::Error {
        crate::Error::Connect {
            url: redact_url(&self.url),
            reason,
        }
    }
}

/// Removes `user:password@` from URLs (comma-separated, as `nats.url` allows) before they are
/// shown.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}<redacted>@{}", &url[..scheme + 3], &url[at + 1..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `[A-Za-z0-9_-]+`: stream, bucket and service names, and aggregate ids.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Dot-separated literal subject tokens.
fn is_subject_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_then_env_then_nats_url_override_each_other() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "jetfn.toml",
                "[nats]\nurl = \"nats://file:4222\"\n[command]\nmax_retries = 3\n",
            )?;
            jail.set_env("JETFN_COMMAND__MAX_RETRIES", "9");
            jail.set_env("JETFN_NATS_SERVER", "/not/a/setting");
            let config = Config::load().unwrap();
            assert_eq!(config.nats.url, "nats://file:4222");
            assert_eq!(config.command.max_retries, 9);
            jail.set_env("NATS_URL", "nats://env:4222");
            assert_eq!(Config::load().unwrap().nats.url, "nats://env:4222");
            Ok(())
        });
    }

    #[test]
    fn a_wrongly_typed_value_names_its_key() {
        Jail::expect_with(|jail| {
            jail.set_env("JETFN_COMMAND__MAX_RETRIES", "many");
            let message = Config::load().unwrap_err().to_string().to_lowercase();
            assert!(message.contains("command.max_retries"), "{message}");
            assert!(message.contains("\"many\""), "{message}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_is_refused() {
        Jail::expect_with(|jail| {
            jail.create_file("jetfn.toml", "[command]\nmax_retrys = 3\n")?;
            let message = Config::load().unwrap_err().to_string();
            assert!(message.contains("max_retrys"), "{message}");
            Ok(())
        });
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn the_crash_hook_is_an_unknown_key_without_fault_injection() {
        Jail::expect_with(|jail| {
            jail.set_env("JETFN_PROJECTION__CRASH_AFTER_COMMITS", "2");
            let message = Config::load().unwrap_err().to_string();
            assert!(message.contains("crash_after_commits"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn durations_use_human_units() {
        Jail::expect_with(|jail| {
            jail.set_env("JETFN_STREAM__DUPLICATE_WINDOW", "5s");
            let config = Config::load().unwrap();
            assert_eq!(config.stream.duplicate_window, Duration::from_secs(5));
            Ok(())
        });
    }

    #[test]
    fn nonsensical_values_name_the_key() {
        let mut config = Config::default();
        config.command.max_in_flight = 0;
        let message = config.validate().unwrap_err().to_string();
        assert_eq!(
            message,
            "configuration: command.max_in_flight: must be at least 1"
        );

        let mut config = Config::default();
        config.command.subject_prefix = Some("a.>".into());
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("command.subject_prefix"), "{message}");
    }

    #[test]
    fn a_jetstream_domain_prefixes_every_jetstream_api_subject() {
        let mut config = Config::default();
        assert_eq!(config.nats.jetstream_api(), "$JS.API");
        config.nats.jetstream_domain = Some("hub".into());
        config.validate().unwrap();
        assert_eq!(config.nats.jetstream_api(), "$JS.hub.API");
        config.nats.jetstream_domain = None;
        config.nats.jetstream_api_prefix = Some("JS.imported.API".into());
        config.validate().unwrap();
        assert_eq!(config.nats.jetstream_api(), "JS.imported.API");
    }

    #[test]
    fn a_jetstream_domain_is_one_token_and_excludes_an_api_prefix() {
        let mut config = Config::default();
        config.nats.jetstream_domain = Some("hub.eu".into());
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("nats.jetstream_domain"), "{message}");
        config.nats.jetstream_domain = Some("hub".into());
        config.nats.jetstream_api_prefix = Some("$JS.hub.API".into());
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("not both"), "{message}");
        config.nats.jetstream_domain = None;
        config.nats.jetstream_api_prefix = Some("$JS.>".into());
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("nats.jetstream_api_prefix"), "{message}");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("nats://bob:pw@host:4222,nats://h2:4222"),
            "nats://<redacted>@host:4222,nats://h2:4222"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = Config::default();
        config.nats.token = Some(Secret::new("s3cr3t"));
        config.nats.password = Some(Secret::new("hunter2"));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }
}

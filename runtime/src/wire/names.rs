//! Every name jetfn gives to things on NATS: subjects, streams, buckets, consumers, services.
//!
//! The defaults derive from the aggregate or projection name; configuration can override the
//! stream, the event subject prefix, the ledger bucket and the command subject prefix.

use crate::config::{Config, is_name};

/// The first token of every command subject: `[<prefix>.]cmd.<aggregate>.<id>.<command>`.
pub const COMMAND_ROOT: &str = "cmd";
/// The stream of dead letters unless `projection.dead_letter_stream` names another.
pub const DEFAULT_DLQ_STREAM: &str = "JETFN_DLQ";
/// The subjects of the dead-letter stream.
pub const DLQ_SUBJECTS: &str = "jetfn.dlq.>";
/// The name of a projection's status endpoint.
pub const STATUS: &str = "status";
/// The name of a projection's rebuild endpoint.
pub const REBUILD: &str = "rebuild";
/// The name of a projection's dead-letter replay endpoint.
pub const DLQ_REPLAY: &str = "dlq.replay";

/// Keys of `$SRV.INFO` metadata that jetfn functions publish.
pub mod meta {
    /// `command` or `projection`.
    pub const KIND: &str = "jetfn.kind";
    /// The aggregate type a command function serves or a projection reads.
    pub const AGGREGATE: &str = "jetfn.aggregate";
    /// The command names, comma-separated.
    pub const COMMANDS: &str = "jetfn.commands";
    /// Each command's JSON Schema, as a JSON object by command name.
    pub const SCHEMAS: &str = "jetfn.schemas";
    /// The event stream.
    pub const STREAM: &str = "jetfn.stream";
    /// The event subject pattern, `<prefix>.<id>`.
    pub const EVENTS: &str = "jetfn.events";
    /// A projection's partition count.
    pub const PARTITIONS: &str = "jetfn.partitions";
    /// A projection's Redis hash tag.
    pub const REDIS_TAG: &str = "jetfn.redis_tag";
    /// A process manager's instance stream.
    pub const INSTANCES: &str = "jetfn.instances";
    /// A process manager's timer stream.
    pub const TIMERS: &str = "jetfn.timers";
}

/// A name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} must match {rule}")]
pub struct NameError {
    /// What kind of name it is.
    pub what: &'static str,
    /// The name.
    pub name: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

/// The rule for aggregate names.
pub const AGGREGATE_NAME_RULE: &str = "[a-z0-9_-]+";
/// The rule for projection names.
pub const PROJECTION_NAME_RULE: &str = "[a-z0-9-]+";

/// Aggregate names: `[a-z0-9_-]+`, the `<aggregate>` token of command and event subjects.
pub fn check_aggregate_name(name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    valid.then_some(()).ok_or_else(|| NameError {
        what: "aggregate name",
        name: name.to_owned(),
        rule: AGGREGATE_NAME_RULE,
    })
}

/// Projection names: `[a-z0-9-]+`. They appear in Redis keys, consumer names and subjects.
pub fn check_projection_name(name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(()).ok_or_else(|| NameError {
        what: "projection name",
        name: name.to_owned(),
        rule: PROJECTION_NAME_RULE,
    })
}

/// The default stream of an aggregate type: `<AGGREGATE>_EVENTS`, upper case, `-` as `_`.
///
/// `a-b` and `a_b` share a default; the stream records its aggregate types
/// ([`STREAM_AGGREGATE_METADATA`]) and a second type whose *default* is the same stream is
/// refused at start-up. Types share a stream only when configured to (`stream.name`).
pub fn default_stream(aggregate: &str) -> String {
    format!(
        "{}_EVENTS",
        aggregate.to_ascii_uppercase().replace('-', "_")
    )
}

/// Stream metadata key listing the aggregate types whose events a stream holds: their names,
/// comma-separated, sorted (`account`; `user,username` for a shared stream).
pub const STREAM_AGGREGATE_METADATA: &str = "jetfn.aggregate";

/// Stream metadata key recording the event subjects of aggregate type `aggregate` in a stream
/// other than its default one (`jetfn.aggregate.user` = `evt.user.*`): a subject prefix belongs
/// to one type.
pub fn stream_subjects_metadata(aggregate: &str) -> String {
    format!("{STREAM_AGGREGATE_METADATA}.{aggregate}")
}

/// The aggregate types a stream's [`STREAM_AGGREGATE_METADATA`] value lists.
pub fn stream_owners(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect()
}

/// The [`STREAM_AGGREGATE_METADATA`] value of `owners`: sorted, without repeats.
pub fn stream_owners_value<'a>(owners: impl IntoIterator<Item = &'a str>) -> String {
    let mut owners: Vec<&str> = owners.into_iter().collect();
    owners.sort_unstable();
    owners.dedup();
    owners.join(",")
}

/// Where one aggregate type's events, commands and ledger live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateNames {
    /// The aggregate type.
    pub aggregate: String,
    /// The event stream.
    pub stream: String,
    /// Events of aggregate `id` are stored on `<event_prefix>.<id>`.
    pub event_prefix: String,
    /// The command ledger's KV bucket.
    pub ledger_bucket: String,
    /// The snapshot KV bucket.
    pub snapshot_bucket: String,
    /// Where commands arrive.
    pub commands: CommandSubjects,
}

impl AggregateNames {
    /// The names of aggregate type `aggregate` under `config`.
    pub fn new(aggregate: &str, config: &Config) -> Result<AggregateNames, NameError> {
        check_aggregate_name(aggregate)?;
        Ok(AggregateNames {
            aggregate: aggregate.to_owned(),
            stream: config
                .stream
                .name
                .clone()
                .unwrap_or_else(|| default_stream(aggregate)),
            event_prefix: config
                .stream
                .subject_prefix
                .clone()
                .unwrap_or_else(|| format!("evt.{aggregate}")),
            ledger_bucket: config
                .ledger
                .bucket
                .clone()
                .unwrap_or_else(|| format!("jetfn-ledger-{aggregate}")),
            snapshot_bucket: format!("jetfn-snapshots-{aggregate}"),
            commands: CommandSubjects::new(config.command.subject_prefix.as_deref(), aggregate),
        })
    }

    /// The subject of one aggregate's events.
    pub fn event_subject(&self, id: &str) -> String {
        format!("{}.{id}", self.event_prefix)
    }

    /// The subject filter of every event of this aggregate type.
    pub fn event_filter(&self) -> String {
        format!("{}.*", self.event_prefix)
    }

    /// The CloudEvents source of this aggregate type's events.
    pub fn event_source(&self) -> String {
        format!("/jetfn/{}", self.aggregate)
    }

    /// The default NATS connection name of the command function.
    pub fn connection(&self) -> String {
        format!("jetfn-{}", self.aggregate)
    }
}

/// The JetStream API prefix without a domain.
pub const JETSTREAM_API: &str = "$JS.API";

/// The JetStream API prefix of domain `domain`: `$JS.<domain>.API`.
pub fn domain_api(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

/// The subject that direct-gets messages of `stream`, under JetStream API prefix `api`.
pub fn direct_get(api: &str, stream: &str) -> String {
    format!("{api}.DIRECT.GET.{stream}")
}

/// The stream behind KV bucket `bucket`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject of `key` in KV bucket `bucket`.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Where a write of `key` in KV bucket `bucket` is published, under JetStream API prefix `api`:
/// the key's subject itself in the local domain, `<api>.$KV.<bucket>.<key>` in another one (the
/// hub's JetStream maps it back to the key's subject, as it does for async-nats KV stores).
pub fn kv_put_subject(api: &str, bucket: &str, key: &str) -> String {
    let subject = kv_subject(bucket, key);
    if api == JETSTREAM_API {
        subject
    } else {
        format!("{api}.{subject}")
    }
}

/// The subject that pings every instance of service `name`.
pub fn service_ping(name: &str) -> String {
    format!("$SRV.PING.{name}")
}

/// The subject that pings every service on the server (NATS services protocol discovery).
pub const SERVICE_PING_ALL: &str = "$SRV.PING";

/// The subject that asks every instance of service `name` for its description and metadata.
pub fn service_info(name: &str) -> String {
    format!("$SRV.INFO.{name}")
}

/// The subject that asks every instance of service `name` for its statistics.
pub fn service_stats(name: &str) -> String {
    format!("$SRV.STATS.{name}")
}

/// The three subjects on which instance `id` of service `name` answers discovery verb `verb`
/// (`PING`, `INFO` or `STATS`): every service, every instance of `name`, and this instance.
pub fn service_verb_subjects(verb: &str, name: &str, id: &str) -> [String; 3] {
    [
        format!("$SRV.{verb}"),
        format!("$SRV.{verb}.{name}"),
        format!("$SRV.{verb}.{name}.{id}"),
    ]
}

/// Where the instances of command function `aggregate` announce themselves to each other, for
/// aggregate affinity: `jetfn.affinity.<aggregate>.members`.
pub fn affinity_members(aggregate: &str) -> String {
    format!("jetfn.affinity.{aggregate}.members")
}

/// Where instance `instance` of command function `aggregate` takes the commands other
/// instances hand it (aggregate affinity): `jetfn.affinity.<aggregate>.to.<instance>`, followed
/// by the command's own subject.
pub fn affinity_inbox(aggregate: &str, instance: &str) -> String {
    format!("jetfn.affinity.{aggregate}.to.{instance}")
}

/// The queue group of control endpoints (projections, process managers), and the default of
/// `command.queue_group`: the NATS services protocol's default, so one instance answers each
/// request.
pub const QUEUE_GROUP: &str = "q";

/// The `type` of a `$SRV.PING` response.
pub const SERVICE_PING_RESPONSE: &str = "io.nats.micro.v1.ping_response";
/// The `type` of a `$SRV.INFO` response.
pub const SERVICE_INFO_RESPONSE: &str = "io.nats.micro.v1.info_response";
/// The `type` of a `$SRV.STATS` response.
pub const SERVICE_STATS_RESPONSE: &str = "io.nats.micro.v1.stats_response";

/// The value of [`meta::KIND`] for a command function.
pub const KIND_COMMAND: &str = "command";
/// The value of [`meta::KIND`] for a projection function.
pub const KIND_PROJECTION: &str = "projection";
/// The value of [`meta::KIND`] for a process manager.
pub const KIND_PROCESS_MANAGER: &str = "process-manager";

/// The bucket whose data `stream` holds, when it is a KV bucket's stream (`KV_<bucket>`).
pub fn kv_bucket(stream: &str) -> Option<&str> {
    stream.strip_prefix("KV_")
}

/// A projection's control endpoint: `jetfn.projection.<name>.<action>`, with `action` one of
/// [`STATUS`], [`REBUILD`], [`DLQ_REPLAY`].
pub fn projection_endpoint(projection: &str, action: &str) -> String {
    format!("jetfn.projection.{projection}.{action}")
}

/// Where a running rebuild publishes its progress.
pub fn rebuild_progress(projection: &str) -> String {
    format!("jetfn.projection.{projection}.rebuild.progress")
}

/// The subject of a projection's dead letters.
pub fn dlq_subject(projection: &str) -> String {
    format!("jetfn.dlq.{projection}")
}

/// The durable consumer a rebuild writes one partition of read-model version `generation`
/// through: `<projection>-g<G>-p<k>`, deleted once the new version is live.
pub fn projection_consumer(projection: &str, generation: u64, partition: u32) -> String {
    format!("{projection}-g{generation}-p{partition}")
}

/// Where one process manager keeps its instances, timers and consumers.
///
/// * instances: stream `PM_<NAME>`, one literal subject per instance `pm.<name>.<correlation>`;
/// * timers: stream `PM_<NAME>_TIMERS` (message schedules need a stream of their own), the
///   schedule of timer `t` of an instance on `jetfn.pm.<name>.timer.<correlation>.<t>` and its
///   firing on `jetfn.pm.<name>.fired.<correlation>.<t>`;
/// * durable consumers `pm-<name>-events` (source events), `pm-<name>-outbox` (the instance
///   stream, which sends the recorded commands and timers) and `pm-<name>-timers` (fired
///   timers);
/// * the status endpoint `jetfn.pm.<name>.status`;
/// * the NATS service `pm-<name>` (not `<name>`: a command function of that aggregate name may
///   run too), whose name also heads its dead letters, `jetfn.dlq.pm-<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessNames {
    /// The process manager's name.
    pub name: String,
    /// The instance stream.
    pub stream: String,
    /// Instance `c` is stored on `<instance_prefix>.c`.
    pub instance_prefix: String,
    /// The timer stream.
    pub timer_stream: String,
}

impl ProcessNames {
    /// The names of process manager `name` (`[a-z0-9-]+`, like a projection's).
    pub fn new(name: &str) -> Result<ProcessNames, NameError> {
        check_projection_name(name).map_err(|e| NameError {
            what: "process manager name",
            ..e
        })?;
        let upper = name.to_ascii_uppercase().replace('-', "_");
        Ok(ProcessNames {
            name: name.to_owned(),
            stream: format!("PM_{upper}"),
            instance_prefix: format!("pm.{name}"),
            timer_stream: format!("PM_{upper}_TIMERS"),
        })
    }

    /// The stream metadata value that marks the instance stream as this process manager's.
    pub fn owner(&self) -> String {
        format!("pm.{}", self.name)
    }

    /// The subjects of the timer stream.
    pub fn timer_subjects(&self) -> String {
        format!("jetfn.pm.{}.>", self.name)
    }

    /// Where timer `timer` of instance `id` is scheduled.
    pub fn timer_schedule(&self, id: &str, timer: &str) -> String {
        format!("jetfn.pm.{}.timer.{id}.{timer}", self.name)
    }

    /// Where timer `timer` of instance `id` fires.
    pub fn timer_fired(&self, id: &str, timer: &str) -> String {
        format!("jetfn.pm.{}.fired.{id}.{timer}", self.name)
    }

    /// The filter of every fired timer.
    pub fn timers_fired(&self) -> String {
        format!("jetfn.pm.{}.fired.>", self.name)
    }

    /// The durable consumer of `role` (`events`, `outbox` or `timers`).
    pub fn consumer(&self, role: &str) -> String {
        format!("pm-{}-{role}", self.name)
    }

    /// The status endpoint.
    pub fn status(&self) -> String {
        format!("jetfn.pm.{}.{STATUS}", self.name)
    }

    /// The NATS connection name.
    pub fn connection(&self) -> String {
        format!("jetfn-pm-{}", self.name)
    }

    /// The NATS service name, and the name its dead letters are filed under.
    pub fn service(&self) -> String {
        format!("pm-{}", self.name)
    }
}

/// The durable consumer the live read model reads one partition through:
/// `<projection>-p<k>`, whatever the version. It keeps its name across rebuilds (it is recreated
/// at the new version's checkpoint when the version switches), so a scaler watching its lag
/// (KEDA's `nats-jetstream` trigger) keeps working.
pub fn live_projection_consumer(projection: &str, partition: u32) -> String {
    format!("{projection}-p{partition}")
}

/// The partitioned view of aggregate type `aggregate`'s events in stream `stream` for
/// projections with `partitions` partitions (more than one): `<STREAM>_P<n>` when the stream is
/// the type's default one, else `<STREAM>_<AGGREGATE>_P<n>` (a configured stream may hold several
/// types, each with a view of its own). It sources the stream; each message carries its
/// event-stream sequence, which checkpoints and consistency tokens keep counting in. Projections of one aggregate
/// type with the same partition count share it.
pub fn partition_view(stream: &str, aggregate: &str, partitions: u32) -> String {
    if stream == default_stream(aggregate) {
        format!("{stream}_P{partitions}")
    } else {
        let aggregate = aggregate.to_ascii_uppercase().replace('-', "_");
        format!("{stream}_{aggregate}_P{partitions}")
    }
}

/// The subject transform of a partitioned view: `<prefix>.*` becomes
/// `<prefix>.<k>.<id>`, with `k` the server's `partition(n, 1)` of the aggregate id (FNV-1a 32
/// bit of the id, modulo n, as the projection runtime computes it too). Returns
/// (source, destination).
pub fn partition_view_transform(event_prefix: &str, partitions: u32) -> (String, String) {
    (
        format!("{event_prefix}.*"),
        format!("{event_prefix}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"),
    )
}

/// The subjects of partition `partition` in a partitioned view: `<prefix>.<k>.*`.
pub fn partition_view_filter(event_prefix: &str, partition: u32) -> String {
    format!("{event_prefix}.{partition}.*")
}

/// Consumer metadata key holding the delivery cursor tag a partition consumer was created with
/// (see `readmodel`'s cursor hash).
pub const CONSUMER_CURSOR_METADATA: &str = "jetfn.cursor";

/// Where an aggregate type's commands arrive: `[<prefix>.]cmd.<aggregate>.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSubjects {
    root: String,
}

impl CommandSubjects {
    /// The command subjects of `aggregate`, under an optional prefix.
    pub fn new(prefix: Option<&str>, aggregate: &str) -> Self {
        let root = match prefix.filter(|p| !p.is_empty()) {
            Some(prefix) => format!("{prefix}.{COMMAND_ROOT}.{aggregate}."),
            None => format!("{COMMAND_ROOT}.{aggregate}."),
        };
        CommandSubjects { root }
    }

    /// The subject of one command: `[<prefix>.]cmd.<aggregate>.<id>.<command>`.
    pub fn subject(&self, id: &str, command: &str) -> String {
        format!("{}{id}.{command}", self.root)
    }

    /// The subscription subject: every subject under the aggregate, so that malformed ones get
    /// an `invalid` reply rather than silence.
    pub fn wildcard(&self) -> String {
        format!("{}>", self.root)
    }

    /// The documented pattern, for service metadata.
    pub fn pattern(&self) -> String {
        format!("{}<id>.<command>", self.root)
    }

    /// Splits `...cmd.<aggregate>.<id>.<command>` into id and command.
    pub fn parse<'s>(&self, subject: &'s str) -> Result<(&'s str, &'s str), String> {
        let rest = subject
            .strip_prefix(&self.root)
            .ok_or_else(|| format!("subject {subject} is not under {}", self.wildcard()))?;
        let mut tokens = rest.split('.');
        match (tokens.next(), tokens.next(), tokens.next()) {
            (Some(id), Some(command), None) => {
                check_id(id)?;
                Ok((id, command))
            }
            _ => Err(format!(
                "subject {subject} must have the form {}",
                self.pattern()
            )),
        }
    }
}

/// The longest aggregate id.
pub const MAX_ID_LEN: usize = 128;

/// Aggregate ids: `[A-Za-z0-9_-]{1,128}`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_ID_LEN || !is_name(id) {
        return Err(format!(
            "aggregate id {id:?} must match [A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitioned_view_keeps_the_prefix_and_puts_the_partition_before_the_id() {
        assert_eq!(
            partition_view("ACCOUNT_EVENTS", "account", 4),
            "ACCOUNT_EVENTS_P4"
        );
        assert_eq!(
            partition_view("PEOPLE", "user-name", 2),
            "PEOPLE_USER_NAME_P2"
        );
        assert_eq!(
            partition_view_transform("evt.account", 4),
            (
                "evt.account.*".to_owned(),
                "evt.account.{{partition(4,1)}}.{{wildcard(1)}}".to_owned()
            )
        );
        assert_eq!(partition_view_filter("evt.account", 3), "evt.account.3.*");
    }

    #[test]
    fn kv_writes_to_another_domain_go_under_its_api_prefix() {
        assert_eq!(
            kv_put_subject(JETSTREAM_API, "jetfn-ledger-account", "a.c1"),
            "$KV.jetfn-ledger-account.a.c1"
        );
        assert_eq!(
            kv_put_subject(&domain_api("hub"), "jetfn-ledger-account", "a.c1"),
            "$JS.hub.API.$KV.jetfn-ledger-account.a.c1"
        );
        assert_eq!(
            direct_get(&domain_api("hub"), "ACCOUNT_EVENTS"),
            "$JS.hub.API.DIRECT.GET.ACCOUNT_EVENTS"
        );
    }

    #[test]
    fn command_subjects_split_id_and_command() {
        let subjects = CommandSubjects::new(None, "account");
        assert_eq!(
            subjects.parse("cmd.account.a-1.deposit"),
            Ok(("a-1", "deposit"))
        );
        assert_eq!(subjects.wildcard(), "cmd.account.>");
        assert_eq!(
            subjects.subject("a-1", "deposit"),
            "cmd.account.a-1.deposit"
        );
    }

    #[test]
    fn a_prefix_comes_before_cmd() {
        let subjects = CommandSubjects::new(Some("eu"), "account");
        assert_eq!(subjects.subject("x", "open"), "eu.cmd.account.x.open");
        assert!(subjects.parse("cmd.account.x.open").is_err());
    }

    #[test]
    fn malformed_command_subjects_name_the_expected_form() {
        let subjects = CommandSubjects::new(None, "account");
        for bad in ["cmd.account.x", "cmd.account.x.open.now"] {
            let err = subjects.parse(bad).unwrap_err();
            assert!(err.contains("cmd.account.<id>.<command>"), "{err}");
        }
    }

    #[test]
    fn ids_are_limited_to_safe_characters_and_128_bytes() {
        assert!(check_id("Ab_9-x").is_ok());
        assert!(check_id(&"a".repeat(128)).is_ok());
        for bad in ["", "a b", "ä", &"a".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn projection_names_allow_no_underscore_and_say_so() {
        assert!(check_projection_name("account-balances").is_ok());
        let err = check_projection_name("account_balances").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"projection name "account_balances" must match [a-z0-9-]+"#
        );
        assert!(check_projection_name("").is_err());
    }

    #[test]
    fn aggregate_names_allow_underscore_and_hyphen() {
        assert!(check_aggregate_name("a_b-c1").is_ok());
        let err = check_aggregate_name("Account").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"aggregate name "Account" must match [a-z0-9_-]+"#
        );
    }

    #[test]
    fn process_manager_names_keep_instances_and_timers_apart() {
        let names = ProcessNames::new("money-transfer").unwrap();
        assert_eq!(names.stream, "PM_MONEY_TRANSFER");
        assert_eq!(names.timer_stream, "PM_MONEY_TRANSFER_TIMERS");
        assert_eq!(
            names.timer_schedule("t1", "deadline"),
            "jetfn.pm.money-transfer.timer.t1.deadline"
        );
        let err = ProcessNames::new("Transfer").unwrap_err().to_string();
        assert_eq!(
            err,
            r#"process manager name "Transfer" must match [a-z0-9-]+"#
        );
    }

    #[test]
    fn configuration_overrides_the_default_names() {
        let mut config = Config::default();
        let names = AggregateNames::new("bank-account", &config).unwrap();
        assert_eq!(names.stream, "BANK_ACCOUNT_EVENTS");
        assert_eq!(names.event_subject("a"), "evt.bank-account.a");
        assert_eq!(names.ledger_bucket, "jetfn-ledger-bank-account");
        config.stream.name = Some("LEDGER".into());
        config.stream.subject_prefix = Some("eu.events".into());
        let names = AggregateNames::new("bank-account", &config).unwrap();
        assert_eq!(names.stream, "LEDGER");
        assert_eq!(names.event_filter(), "eu.events.*");
    }
}

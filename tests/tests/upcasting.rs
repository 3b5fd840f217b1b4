//! Event versioning: events written by version 1 of a type are read by version 2 code through an
//! upcaster, in the aggregate and in a projection; events newer or unknown to the code are clear
//! errors (an `unavailable` reply, a dead letter), never a panic or a silent skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::HeaderMap;
use jetfn::aggregate::Upcasters;
use jetfn::command::ErrorKind;
use jetfn::projection::DeadLetters;
use jetfn::readmodel::{Keys, ReadModel};
use jetfn::{Aggregate, Projection, Recorded, RedisWrites, Refusal, Rejection};
use jetfn_tests::commands::send_raw;
use jetfn_tests::readmodels::projection_config;
use jetfn_tests::workload::poll;
use jetfn_tests::{NatsServer, RedisServer};
use redis::AsyncCommands;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

/// Version 1 of the wallet, as an older release wrote it: credits in `cents`.
mod v1 {
    use super::*;

    #[derive(Default)]
    pub struct Wallet;

    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    pub enum Command {
        Credit { cents: u64 },
    }

    #[derive(Serialize, Deserialize, JsonSchema)]
    pub enum Event {
        Credited { cents: u64 },
    }

    impl Aggregate for Wallet {
        const NAME: &'static str = "wallet";
        type Command = Command;
        type Event = Event;

        fn decide(&self, Command::Credit { cents }: Command) -> Result<Vec<Event>, Rejection> {
            Ok(vec![Event::Credited { cents }])
        }

        fn evolve(self, _: &Event) -> Self {
            self
        }
    }
}

/// Version 2: credits carry an amount and a currency; debits need the balance.
mod v2 {
    use super::*;

    #[derive(Default)]
    pub struct Wallet {
        pub balance: u64,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    pub enum Command {
        Debit { amount: u64 },
    }

    #[derive(Serialize, Deserialize, JsonSchema)]
    pub enum Event {
        Credited { amount: u64, currency: String },
        Debited { amount: u64 },
    }

    impl Aggregate for Wallet {
        const NAME: &'static str = "wallet";
        type Command = Command;
        type Event = Event;

        fn decide(&self, Command::Debit { amount }: Command) -> Result<Vec<Event>, Rejection> {
            if amount > self.balance {
                return Err(Rejection::new(format!(
                    "insufficient funds: {}",
                    self.balance
                )));
            }
            Ok(vec![Event::Debited { amount }])
        }

        fn evolve(self, event: &Event) -> Self {
            match event {
                Event::Credited { amount, .. } => Wallet {
                    balance: self.balance + amount,
                },
                Event::Debited { amount } => Wallet {
                    balance: self.balance - amount,
                },
            }
        }

        fn event_version(event_type: &str) -> u32 {
            if event_type == "Credited" { 2 } else { 1 }
        }

        fn upcasters() -> Upcasters {
            Upcasters::default().add("Credited", 1, |v1| {
                let cents = v1["cents"].as_u64().ok_or("cents is missing")?;
                Ok(json!({"amount": cents, "currency": "EUR"}))
            })
        }
    }

    /// Per wallet: `credited` and `balance`.
    pub struct Totals;

    impl Projection for Totals {
        const NAME: &'static str = "wallet-totals";
        type Source = Wallet;

        fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
            let key = format!("wallet:{}", event.aggregate_id);
            match &event.event {
                Event::Credited { amount, currency } => {
                    writes
                        .hincr(&key, "credited", *amount as i64)
                        .hincr(&key, "balance", *amount as i64)
                        .hset(&key, "currency", currency);
                }
                Event::Debited { amount } => {
                    writes.hincr(&key, "balance", -(*amount as i64));
                }
            }
            Ok(())
        }
    }
}

async fn wallet_hash(redis: &RedisServer, id: &str) -> std::collections::BTreeMap<String, String> {
    let model = ReadModel::connect(&redis.url(), v2::Totals::NAME)
        .await
        .unwrap();
    let generation = model.active_generation().await.unwrap().unwrap_or(1);
    let mut connection = redis.connect().await.unwrap();
    connection
        .hgetall(Keys::new(v2::Totals::NAME).key(generation, &format!("wallet:{id}")))
        .await
        .unwrap()
}

/// Publishes an event the way some other writer might have: raw, with the given type and version.
async fn publish_raw(client: &async_nats::Client, id: &str, event_type: &str, version: u32) {
    let mut headers = HeaderMap::new();
    headers.insert("ce-type", event_type);
    headers.insert("jetfn-event-version", version.to_string().as_str());
    async_nats::jetstream::new(client.clone())
        .publish_with_headers(
            format!("evt.wallet.{id}"),
            headers,
            r#"{"amount":1}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_events_are_read_by_version_2_code_in_the_aggregate_and_the_projection() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let client = nats.connect().await.unwrap();

    let old = jetfn::command_function::<v1::Wallet>()
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    for cents in [5, 7] {
        let body = json!({ "cents": cents }).to_string();
        send_raw(&client, "cmd.wallet.w1.credit", body, None)
            .await
            .unwrap()
            .accepted();
    }
    old.stop().await.unwrap();

    let new = jetfn::command_function::<v2::Wallet>()
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    let too_much = send_raw(&client, "cmd.wallet.w1.debit", r#"{"amount":13}"#, None)
        .await
        .unwrap();
    assert_eq!(
        too_much.error_message.as_deref(),
        Some("insufficient funds: 12")
    );
    let debit = send_raw(&client, "cmd.wallet.w1.debit", r#"{"amount":12}"#, None)
        .await
        .unwrap();
    assert_eq!(debit.accepted().version, 3);

    let projection = jetfn::projection_function(v2::Totals)
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    let model = ReadModel::connect(&redis.url(), v2::Totals::NAME)
        .await
        .unwrap();
    model
        .wait_for(debit.accepted().seq, Duration::from_secs(10))
        .await
        .unwrap();
    let hash = wallet_hash(&redis, "w1").await;
    assert_eq!(hash.get("credited").map(String::as_str), Some("12"));
    assert_eq!(hash.get("balance").map(String::as_str), Some("0"));
    assert_eq!(hash.get("currency").map(String::as_str), Some("EUR"));
    projection.stop().await.unwrap();
    new.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_newer_than_the_code_or_of_unknown_types_are_clear_errors() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let client = nats.connect().await.unwrap();
    let function = jetfn::command_function::<v2::Wallet>()
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    publish_raw(&client, "w2", "Credited", 3).await;
    publish_raw(&client, "w3", "Teleported", 1).await;

    for (id, expected) in [("w2", "newer than this code knows"), ("w3", "Teleported")] {
        let subject = format!("cmd.wallet.{id}.debit");
        let sent = send_raw(&client, &subject, r#"{"amount":1}"#, None)
            .await
            .unwrap();
        assert_eq!(
            sent.reply.error_kind(),
            Some(ErrorKind::Unavailable),
            "{id}"
        );
        let message = sent.error_message.unwrap();
        assert!(message.contains(expected), "{id}: {message}");
    }

    let projection = jetfn::projection_function(v2::Totals)
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    let letters = DeadLetters::connect(&config).await.unwrap();
    let dead = poll(
        "both events dead-lettered",
        Duration::from_secs(20),
        || async {
            let dead = letters.list(v2::Totals::NAME).await?;
            Ok((dead.len() == 2).then_some(dead))
        },
    )
    .await
    .unwrap();
    assert!(
        dead[0].error.contains("newer than this code knows"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[0].subject, "evt.wallet.w2");
    assert!(dead[1].error.contains("Teleported"), "{}", dead[1].error);
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

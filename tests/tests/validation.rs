//! The committed schemas and the function's behaviour agree: on a corpus of good and bad bodies,
//! a body the schema accepts is never `invalid`, and a body it refuses is always `invalid`
//! with the failing field named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::command::ErrorKind;
use jetfn_tests::NatsServer;
use jetfn_tests::commands::{account_config, send, send_raw, start_account};
use jetfn_tests::schemas::schemas_dir;
use serde_json::{Value, json};

fn schema(command: &str) -> Value {
    let path = schemas_dir().join(format!("account/commands/{command}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn corpus() -> Vec<(&'static str, Value)> {
    let long = "x".repeat(201);
    vec![
        ("open", json!({"owner": "Ann"})),
        ("open", json!({"owner": "Ann", "initial_deposit": 5})),
        ("open", json!({"owner": "Ann", "initial_deposit": null})),
        ("open", json!({"owner": "é".repeat(200)})),
        ("open", json!({})),
        ("open", json!({"owner": ""})),
        ("open", json!({"owner": "   "})),
        ("open", json!({"owner": long})),
        ("open", json!({"owner": 5})),
        ("open", json!({"owner": "Ann", "extra": 1})),
        ("open", json!({"owner": "Ann", "initial_deposit": 0})),
        ("open", json!({"owner": "Ann", "initial_deposit": -1})),
        ("open", json!({"owner": "Ann", "initial_deposit": 1.5})),
        ("open", json!({"owner": "Ann", "initial_deposit": "5"})),
        ("deposit", json!({"amount": 1})),
        ("deposit", json!({"amount": 18_446_744_073_709_551_615u64})),
        ("deposit", json!({"amount": 0})),
        ("deposit", json!({"amount": "1"})),
        ("deposit", json!({"amount": null})),
        ("deposit", json!({})),
        ("deposit", json!({"amount": [1]})),
        ("withdraw", json!({"amount": 1})),
        ("withdraw", json!({"amount": -3})),
        ("withdraw", json!({"amount": 1, "memo": "x"})),
        ("close", json!({})),
        ("close", json!({"now": true})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_and_the_function_agree_on_every_body_of_the_corpus() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    send(
        &client,
        "rich",
        "open",
        json!({"owner": "Rich", "initial_deposit": 1000}),
        None,
    )
    .await
    .unwrap()
    .accepted();

    let mut disagreements = Vec::new();
    for (n, (command, body)) in corpus().into_iter().enumerate() {
        let valid = jsonschema::is_valid(&schema(command), &body);
        let id = if command == "open" {
            format!("new-{n}")
        } else {
            "rich".to_owned()
        };
        let subject = format!("cmd.account.{id}.{command}");
        let sent = send_raw(&client, &subject, body.to_string(), None)
            .await
            .unwrap();
        let invalid = sent.reply.error_kind() == Some(ErrorKind::Invalid);
        if valid == invalid {
            disagreements.push(format!(
                "{command} {body}: schema says {}, function replied {}",
                if valid { "valid" } else { "invalid" },
                sent.body
            ));
        }
        if invalid {
            let message = sent.error_message.unwrap();
            let names_a_field = message.starts_with('/') || message.contains("missing field");
            assert!(names_a_field, "{command} {body}: {message}");
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    function.stop().await.unwrap();
}

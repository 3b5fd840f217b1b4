//! The typed Rust client against the real account function.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use account::{Account, Amount, Command};
use jetfn::client::{ClientError, CommandClient};
use jetfn::command::ErrorKind;
use jetfn_tests::NatsServer;
use jetfn_tests::commands::{ACCOUNT_STREAM, account_config, start_account, stored_messages};
use std::time::Duration;

fn amount(value: u64) -> Amount {
    Amount::try_from(value).unwrap()
}

fn open(owner: &str) -> Command {
    serde_json::from_value(serde_json::json!({"open": {"owner": owner}})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_commands_get_typed_replies_and_rejections() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = CommandClient::new(nats.connect().await.unwrap());

    let opened = client.send::<Account>("t1", &open("Ann")).await.unwrap();
    assert_eq!(
        (opened.version, opened.events.clone()),
        (1, vec!["AccountOpened".to_owned()])
    );
    let deposited = client
        .send::<Account>("t1", &Command::Deposit { amount: amount(40) })
        .await
        .unwrap();
    assert_eq!(deposited.version, 2);

    let refused = client
        .send::<Account>("t1", &Command::Withdraw { amount: amount(41) })
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), Some(ErrorKind::Rejected));
    assert_eq!(
        refused.to_string(),
        "rejected (422): insufficient funds: balance is 40"
    );
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_command_is_retried_under_the_same_id_and_applied_once() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let client = CommandClient::new(nats.connect().await.unwrap())
        .timeout(Duration::from_millis(500))
        .attempts(20);

    // No function runs yet: the first attempts find no responder.
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id::<Account>("t2", &open("Bo"), "open-t2")
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let function = start_account(account_config(&nats)).await.unwrap();
    let accepted = sending.await.unwrap().unwrap();
    assert_eq!(accepted.version, 1);

    // Sending it again, as a client that lost the reply would, changes nothing.
    let again = client
        .send_with_id::<Account>("t2", &open("Bo"), "open-t2")
        .await
        .unwrap();
    assert_eq!(again, accepted);
    let events = stored_messages(
        &nats.connect().await.unwrap(),
        ACCOUNT_STREAM,
        Some("evt.account.t2"),
    )
    .await
    .unwrap();
    assert_eq!(events.len(), 1);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_says_no_reply_rather_than_a_failure() {
    let nats = NatsServer::start().await.unwrap();
    let client = CommandClient::new(nats.connect().await.unwrap())
        .timeout(Duration::from_millis(100))
        .attempts(2);
    let err = client.send::<Account>("t3", &open("Cy")).await.unwrap_err();
    assert!(matches!(err, ClientError::NoReply(_)), "{err:?}");
}

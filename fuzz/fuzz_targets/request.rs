//! The command function's request checks (subject, headers, body, then decoding into the
//! account's commands) on anything a client could send: they never panic, and what they accept
//! is what the wire contract promises and can be stored as an event.

#![no_main]

use bytes::Bytes;
use jetfn::fuzzing::{MAX_COMMAND_ID_LEN, check_request, fingerprint};
use jetfn::wire::event::{EventMeta, headers as event_headers};
use jetfn::wire::names::check_id;
use jetfn::wire::{CommandSubjects, StoredEvent, header};
use jetfn_fuzz::{Body, Headers};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// The subject: built from parts under the account's root most of the time, or any text.
#[derive(Arbitrary, Debug)]
enum Subject<'a> {
    Parts { id: &'a str, command: Command<'a> },
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Command<'a> {
    Open,
    Deposit,
    Withdraw,
    Close,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    prefix: Option<&'a str>,
    subject: Subject<'a>,
    headers: Headers<'a>,
    body: Body<'a>,
    max_body_bytes: u16,
}

fuzz_target!(|input: Input<'_>| {
    let subjects = CommandSubjects::new(input.prefix, "account");
    let subject = match &input.subject {
        Subject::Parts { id, command } => {
            let command = match command {
                Command::Open => "open",
                Command::Deposit => "deposit",
                Command::Withdraw => "withdraw",
                Command::Close => "close",
                Command::Other(other) => other,
            };
            subjects.subject(id, command)
        }
        Subject::Raw(raw) => (*raw).to_owned(),
    };
    let headers = input.headers.to_map();
    let body = input.body.to_bytes();
    let max_body_bytes = usize::from(input.max_body_bytes);
    let Ok((checked, _command)) = check_request::<account::Account>(
        &subjects,
        &subject,
        headers.as_ref(),
        &body,
        max_body_bytes,
    ) else {
        return;
    };

    // What passed is what the contract promises.
    assert!(check_id(&checked.id).is_ok(), "{checked:?}");
    assert_eq!(subjects.subject(&checked.id, &checked.command), subject);
    let id = &checked.command_id;
    assert!(
        (1..=MAX_COMMAND_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()),
        "{checked:?}"
    );
    if let Some(sent) = header::get(headers.as_ref(), header::MSG_ID) {
        assert_eq!(sent, id);
    }
    assert!(body.len() <= max_body_bytes, "{checked:?}");
    assert!(checked.body.is_object(), "{checked:?}");
    assert_eq!(
        checked.fingerprint,
        fingerprint(&checked.command, &checked.body)
    );
    assert_eq!(checked.trace.trace_id.len(), 32, "{checked:?}");

    // And it can be written as an event and read back.
    let meta = EventMeta {
        source: "/jetfn/account",
        aggregate_id: &checked.id,
        command_id: &checked.command_id,
        command: &checked.command,
        fingerprint: Some(&checked.fingerprint),
        trace: Some(&checked.trace),
        time: "2026-01-01T00:00:00Z",
        previous_seq: Some(0),
    };
    let written = event_headers(&meta, 0, "MoneyDeposited", 1);
    let event = StoredEvent::decode(1, Some(&written), Bytes::new()).expect("readable");
    assert_eq!(
        event.command_id.as_deref(),
        Some(checked.command_id.as_str())
    );
    assert_eq!(
        event.fingerprint.as_deref(),
        Some(checked.fingerprint.as_str())
    );
    assert_eq!(event.event_type, "MoneyDeposited");
});

//! The direct-get reply classifier and the publish-acknowledgement parser on any message a
//! server (or something posing as one) could send back: they never panic, and what they read
//! is consistent with the message.

#![no_main]

use async_nats::{Message, StatusCode};
use bytes::Bytes;
use jetfn::wire::header;
use jetfn::wire::jetstream::{DirectReply, PubAck, direct_reply, parse_pub_ack};
use jetfn_fuzz::Headers;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    subject: &'a str,
    headers: Headers<'a>,
    status: Option<u16>,
    description: Option<&'a str>,
    payload: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let headers = input.headers.to_map();
    let message = Message {
        subject: input.subject.into(),
        reply: None,
        payload: Bytes::copy_from_slice(input.payload),
        headers: headers.clone(),
        status: input
            .status
            .and_then(|code| StatusCode::from_u16(code).ok()),
        description: input.description.map(str::to_owned),
        length: input.payload.len(),
    };
    match direct_reply(&message) {
        DirectReply::Event(event) => {
            assert!(matches!(message.status, None | Some(StatusCode::OK)));
            assert_eq!(
                Some(event.seq),
                header::get_u64(headers.as_ref(), header::NATS_SEQUENCE)
            );
            assert_eq!(event.payload, message.payload);
        }
        DirectReply::EndOfBatch { .. } => {
            assert_eq!(message.status.map(|s| s.as_u16()), Some(204));
        }
        DirectReply::NotFound
        | DirectReply::NoStream
        | DirectReply::Malformed(_)
        | DirectReply::Failed(_) => {}
    }
    match parse_pub_ack(input.payload) {
        Ok(PubAck::Stored(seq)) => assert!(seq > 0),
        Ok(PubAck::Duplicate(_)) | Ok(PubAck::Refused { .. }) => {}
        Err(reason) => assert!(!reason.is_empty()),
    }
});

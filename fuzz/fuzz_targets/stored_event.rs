//! The stored-event decoder on any headers and payload a stream could hold: it never panics,
//! and what it decodes says what the headers say.

#![no_main]

use bytes::Bytes;
use jetfn::wire::{StoredEvent, header};
use jetfn_fuzz::Headers;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    seq: u64,
    headers: Headers<'a>,
    payload: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let headers = input.headers.to_map();
    let payload = Bytes::copy_from_slice(input.payload);
    match StoredEvent::decode(input.seq, headers.as_ref(), payload.clone()) {
        Ok(event) => {
            assert_eq!(event.seq, input.seq);
            assert!(!event.event_type.is_empty());
            assert_eq!(
                Some(event.event_type.as_str()),
                header::get(headers.as_ref(), header::CE_TYPE)
            );
            let version = header::get(headers.as_ref(), header::EVENT_VERSION);
            assert_eq!(
                event.version,
                version.map_or(1, |v| v.parse().expect("decoded, so numeric"))
            );
            assert_eq!(
                event.command_id.as_deref(),
                header::get(headers.as_ref(), header::COMMAND_ID)
            );
            assert_eq!(event.payload, payload);
        }
        Err(malformed) => {
            assert_eq!(malformed.seq, input.seq);
            assert!(!malformed.reason.is_empty());
        }
    }
});

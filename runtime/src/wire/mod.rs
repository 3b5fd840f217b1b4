//! The wire: every name jetfn gives to things on NATS, every header it reads or writes, and the
//! encoding of every message it exchanges with JetStream.
//!
//! * [`names`]: streams, subjects (commands, events, dead letters, control endpoints), KV
//!   buckets, consumers, service metadata keys;
//! * [`header`]: header names, and the one way to read a header;
//! * [`event`]: the headers of a stored event, and its decoding;
//! * [`jetstream`]: publish acknowledgements, direct get batches, atomic batch headers.
//!
//! The runtime, the `jetfn` CLI, the typed client and the test harness take names from here, so
//! a deployment's custom stream or subject prefix is followed everywhere.
//! `docs/protocol.md` is the contract these implement.

pub mod event;
pub mod header;
pub mod jetstream;
pub mod names;

pub use event::{MalformedEvent, StoredEvent};
pub use names::{AggregateNames, CommandSubjects, NameError};

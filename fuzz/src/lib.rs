//! What the fuzz targets share: turning fuzz input into the NATS headers, subjects and JSON a
//! client could send.

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use jetfn::wire::header;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use std::str::FromStr;

/// A header name: one jetfn reads, most of the time, or any other.
#[derive(Arbitrary, Debug)]
pub enum Name<'a> {
    /// `Nats-Msg-Id`.
    MsgId,
    /// `traceparent`.
    Traceparent,
    /// `tracestate`.
    Tracestate,
    /// `ce-type`.
    CeType,
    /// `jetfn-event-version`.
    EventVersion,
    /// `jetfn-command-id`.
    CommandId,
    /// `Nats-Sequence`.
    Sequence,
    /// `Nats-Num-Pending`.
    NumPending,
    /// Anything else.
    Other(&'a str),
}

impl Name<'_> {
    fn header_name(&self) -> Option<HeaderName> {
        let name = match self {
            Name::MsgId => return Some(header::MSG_ID),
            Name::Sequence => return Some(header::NATS_SEQUENCE),
            Name::Traceparent => header::TRACEPARENT,
            Name::Tracestate => header::TRACESTATE,
            Name::CeType => header::CE_TYPE,
            Name::EventVersion => header::EVENT_VERSION,
            Name::CommandId => header::COMMAND_ID,
            Name::NumPending => header::NUM_PENDING,
            Name::Other(name) => name,
        };
        HeaderName::from_str(name).ok()
    }
}

/// Headers as a client may send them: names and values, inserted (replacing) or appended.
#[derive(Arbitrary, Debug)]
pub struct Headers<'a>(pub Vec<(Name<'a>, &'a str, bool)>);

impl Headers<'_> {
    /// The header map, leaving out what NATS headers cannot carry (a `HeaderName` or
    /// `HeaderValue` that does not parse).
    pub fn to_map(&self) -> Option<HeaderMap> {
        if self.0.is_empty() {
            return None;
        }
        let mut map = HeaderMap::new();
        for (name, value, append) in &self.0 {
            let (Some(name), Ok(value)) = (name.header_name(), HeaderValue::from_str(value)) else {
                continue;
            };
            if *append {
                map.append(name, value);
            } else {
                map.insert(name, value);
            }
        }
        Some(map)
    }
}

/// A small JSON value.
#[derive(Arbitrary, Debug)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An unsigned integer.
    Unsigned(u64),
    /// A signed integer.
    Signed(i64),
    /// A float.
    Float(f64),
    /// A string.
    Text(&'a str),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object.
    Object(Vec<(Field<'a>, Json<'a>)>),
}

/// An object key: one the account commands know, most of the time.
#[derive(Arbitrary, Debug)]
pub enum Field<'a> {
    /// `owner`.
    Owner,
    /// `initial_deposit`.
    InitialDeposit,
    /// `amount`.
    Amount,
    /// Anything else.
    Other(&'a str),
}

impl Json<'_> {
    /// As a `serde_json` value.
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Unsigned(n) => Value::from(*n),
            Json::Signed(n) => Value::from(*n),
            Json::Float(f) => Value::from(*f),
            Json::Text(s) => Value::from(*s),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(field, value)| {
                        let key = match field {
                            Field::Owner => "owner",
                            Field::InitialDeposit => "initial_deposit",
                            Field::Amount => "amount",
                            Field::Other(key) => key,
                        };
                        (key.to_owned(), value.to_value())
                    })
                    .collect(),
            ),
        }
    }
}

/// A body: raw bytes, or JSON.
#[derive(Arbitrary, Debug)]
pub enum Body<'a> {
    /// Any bytes.
    Raw(&'a [u8]),
    /// JSON text of a value.
    Json(Json<'a>),
}

impl Body<'_> {
    /// The bytes sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Body::Raw(bytes) => bytes.to_vec(),
            Body::Json(json) => json.to_value().to_string().into_bytes(),
        }
    }
}

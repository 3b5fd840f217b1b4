//! The reply contract clients in any language depend on.
//!
//! Success: `{"ok":true,"id":"<aggregate id>","version":V,"seq":S,"events":["Type",..]}`.
//! Failure: `{"ok":false,"error":{"kind":K,"message":"..."}}`, with the same code and message in
//! the `Nats-Service-Error-Code` and `Nats-Service-Error` headers.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The reply to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireReply", try_from = "WireReply")]
pub enum Reply {
    /// The command was applied (possibly deciding no events).
    Accepted(Accepted),
    /// The command was not applied.
    Failed(Failure),
}

/// A successful command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Accepted {
    /// The aggregate id.
    pub id: String,
    /// The number of events in the aggregate after the command.
    pub version: u64,
    /// The stream sequence of the last event written, or of the aggregate's last event when the
    /// command wrote none (0 for an empty aggregate). A consistency token for reads.
    pub seq: u64,
    /// The types of the events the command wrote, in order.
    pub events: Vec<String>,
    /// An atomic decision's reply: every aggregate it wrote, with its new version (empty for a
    /// single-aggregate command, and then left out of the JSON). `seq` is then the sequence of
    /// the batch's last message and `version` is 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregates: Vec<Written>,
}

/// One aggregate an atomic decision wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Written {
    /// The aggregate type.
    pub aggregate: String,
    /// The aggregate id.
    pub id: String,
    /// The number of events in the aggregate after the decision.
    pub version: u64,
    /// The stream sequence of the aggregate's last event after the decision.
    pub seq: u64,
    /// The types of the events written to it, in order.
    pub events: Vec<String>,
}

/// A failed command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Failure {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A human-readable explanation.
    pub message: String,
    /// A machine-readable code for rejections, when the domain gives one
    /// (for example `insufficient_funds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The kinds of failure, each with an HTTP-like status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: not JSON, wrong types, missing fields, unknown command, bad id, too large.
    Invalid,
    /// 422: the domain said no.
    Rejected,
    /// 409: optimistic-concurrency retries were exhausted.
    Conflict,
    /// 503: JetStream or storage unreachable or timed out.
    Unavailable,
}

impl ErrorKind {
    /// The status code sent in `Nats-Service-Error-Code`.
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::Rejected => 422,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The wire name (`invalid`, `rejected`, `conflict`, `unavailable`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Reply {
    /// A failure of the given kind.
    pub fn failed(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Failed(Failure {
            kind,
            message: message.into(),
            code: None,
        })
    }

    /// The rejection of a command by the domain, with its code if it has one.
    pub fn rejected(rejection: &crate::Rejection) -> Reply {
        Reply::Failed(Failure {
            kind: ErrorKind::Rejected,
            message: rejection.message().to_owned(),
            code: rejection.code().map(str::to_owned),
        })
    }

    /// The failure kind, or `None` for a success.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        match self {
            Reply::Accepted(_) => None,
            Reply::Failed(failure) => Some(failure.kind),
        }
    }

    /// The outcome name used in logs and stats: `accepted` or the error kind.
    pub fn outcome(&self) -> &'static str {
        self.error_kind().map_or("accepted", ErrorKind::as_str)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The flat JSON shape of both variants.
#[derive(Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    accepted: Option<Accepted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<Failure>,
}

impl From<Reply> for WireReply {
    fn from(reply: Reply) -> Self {
        match reply {
            Reply::Accepted(accepted) => WireReply {
                ok: true,
                accepted: Some(accepted),
                error: None,
            },
            Reply::Failed(failure) => WireReply {
                ok: false,
                accepted: None,
                error: Some(failure),
            },
        }
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = String;

    fn try_from(wire: WireReply) -> Result<Self, Self::Error> {
        match wire {
            WireReply {
                ok: true,
                accepted: Some(accepted),
                ..
            } => Ok(Reply::Accepted(accepted)),
            WireReply {
                ok: false,
                error: Some(failure),
                ..
            } => Ok(Reply::Failed(failure)),
            _ => Err(
                "a reply needs ok:true with id/version/seq/events, or ok:false with error".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_success_has_the_documented_shape() {
        let reply = Reply::Accepted(Accepted {
            id: "a1".into(),
            version: 2,
            seq: 9,
            events: vec!["AccountOpened".into(), "MoneyDeposited".into()],
            aggregates: Vec::new(),
        });
        let json: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap();
        assert_eq!(
            json,
            json!({"ok":true,"id":"a1","version":2,"seq":9,"events":["AccountOpened","MoneyDeposited"]})
        );
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), reply);
    }

    #[test]
    fn a_failure_has_the_documented_shape() {
        let reply = Reply::failed(ErrorKind::Rejected, "insufficient funds");
        let json: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap();
        assert_eq!(
            json,
            json!({"ok":false,"error":{"kind":"rejected","message":"insufficient funds"}})
        );
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), reply);
    }

    #[test]
    fn a_rejection_with_a_code_carries_it_as_error_code() {
        let rejection = crate::Rejection::new("insufficient funds").with_code("insufficient_funds");
        let json: serde_json::Value =
            serde_json::from_slice(&Reply::rejected(&rejection).to_json()).unwrap();
        assert_eq!(
            json,
            json!({"ok":false,"error":{"kind":"rejected","message":"insufficient funds","code":"insufficient_funds"}})
        );
    }

    #[test]
    fn error_kinds_have_http_like_codes() {
        let codes = [
            ErrorKind::Invalid,
            ErrorKind::Rejected,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
        ]
        .map(ErrorKind::code);
        assert_eq!(codes, [400, 422, 409, 503]);
    }
}

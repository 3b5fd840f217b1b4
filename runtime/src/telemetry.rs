//! Logging, trace context and process signals.
//!
//! Functions log through `tracing`. Each command is one `command` span with the fields
//! `aggregate`, `id`, `command`, `command_id`, `trace_id`, `outcome`, `retries` and
//! `duration_ms`; each event a projection applies is an `apply` span (debug level) with
//! `projection`, `seq`, `event_type`, `id` and `trace_id`. `RUST_LOG` filters (default `info`);
//! `JETFN_LOG_FORMAT=json` prints one JSON object per line.
//!
//! W3C trace context: a command's `traceparent` (and `tracestate`) request headers are kept, or a
//! new trace is started; every event the command stores carries the trace, and projections pick
//! it up, so one trace id follows a command from the client into the read model.

use async_nats::HeaderMap;
use rand::Rng;
use tracing_subscriber::EnvFilter;

/// Installs a subscriber filtered by `RUST_LOG` (default `info`), as text or, with
/// `JETFN_LOG_FORMAT=json`, as JSON lines. Does nothing if a subscriber is already installed,
/// so tests and embedding programs keep theirs.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("JETFN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// A W3C trace context (`traceparent` plus optional `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the span that sent this message.
    pub parent_id: String,
    /// Trace flags, e.g. `01` (sampled).
    pub flags: String,
    /// The vendor state, passed on untouched.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Reads `traceparent`/`tracestate` from headers; `None` when absent or malformed.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<TraceContext> {
        let headers = headers?;
        let parent = headers.get("traceparent")?.as_str();
        let mut parts = parent.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        valid.then(|| TraceContext {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
            tracestate: headers.get("tracestate").map(|v| v.as_str().to_owned()),
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> TraceContext {
        let mut rng = rand::rng();
        TraceContext {
            trace_id: format!("{:032x}", rng.random::<u128>().max(1)),
            parent_id: format!("{:016x}", rng.random::<u64>().max(1)),
            flags: "01".into(),
            tracestate: None,
        }
    }

    /// The context for a message sent from a new span of the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            parent_id: format!("{:016x}", rand::rng().random::<u64>().max(1)),
            ..self.clone()
        }
    }

    /// Writes `traceparent` (and `tracestate`) into headers.
    pub fn write(&self, headers: &mut HeaderMap) {
        let parent = format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags);
        headers.insert("traceparent", parent.as_str());
        if let Some(state) = &self.tracestate {
            headers.insert("tracestate", state.as_str());
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(parent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", parent);
        headers
    }

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_with_a_new_parent() {
        let incoming = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let context = TraceContext::from_headers(Some(&incoming)).unwrap();
        assert_eq!(context.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = context.child();
        let mut out = HeaderMap::new();
        child.write(&mut out);
        let written = out.get("traceparent").unwrap().as_str();
        assert!(
            written.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{written}"
        );
        assert!(written.ends_with("-01"));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "nonsense",
        ] {
            assert_eq!(
                TraceContext::from_headers(Some(&headers(bad))),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_new_root_is_a_valid_context() {
        let mut out = HeaderMap::new();
        TraceContext::new_root().write(&mut out);
        assert!(TraceContext::from_headers(Some(&out)).is_some());
    }
}

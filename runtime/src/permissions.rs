//! Permission violations reported by the NATS server, turned into clear, fast errors.
//!
//! A denied publish or subscribe is reported by the server asynchronously (`-ERR 'Permissions
//! Violation for Publish to "evt.account.alice"'`); the request that caused it would otherwise
//! just time out. Every connection made by [`crate::config::NatsConfig::connect`] forwards such
//! reports here; waiting code races its request against a report naming its subject.

use std::sync::OnceLock;
use tokio::sync::broadcast;

fn channel() -> &'static broadcast::Sender<String> {
    static CHANNEL: OnceLock<broadcast::Sender<String>> = OnceLock::new();
    CHANNEL.get_or_init(|| broadcast::channel(64).0)
}

/// Records a server error if it is a permission violation; returns whether it was.
pub(crate) fn report(message: &str) -> bool {
    if !message.contains("Permissions Violation") {
        return false;
    }
    tracing::error!(
        error = message,
        "NATS denied this function a subject; grant it (see deploy/README.md)"
    );
    // Nobody listening is fine: nothing waits on that subject.
    let _ = channel().send(message.to_owned());
    true
}

/// Reports from now on.
pub(crate) fn watch() -> broadcast::Receiver<String> {
    channel().subscribe()
}

/// Completes with the report once one names `subject` (quoted, as the server writes it).
pub(crate) async fn denied(watch: &mut broadcast::Receiver<String>, subject: &str) -> String {
    denied_any(watch, &[subject]).await
}

/// Completes with the report once one names any of `subjects`.
pub(crate) async fn denied_any(
    watch: &mut broadcast::Receiver<String>,
    subjects: &[impl AsRef<str>],
) -> String {
    let quoted: Vec<String> = subjects
        .iter()
        .map(|s| format!("\"{}\"", s.as_ref()))
        .collect();
    loop {
        match watch.recv().await {
            Ok(message) if quoted.iter().any(|q| message.contains(q)) => return message,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_violation_naming_the_subject_is_delivered_to_who_waits_for_it() {
        let mut watching = watch();
        assert!(!report("some other error"));
        assert!(report(
            r#"Permissions Violation for Publish to "evt.other.x""#
        ));
        assert!(report(
            r#"Permissions Violation for Publish to "evt.account.alice""#
        ));
        let message = denied(&mut watching, "evt.account.alice").await;
        assert!(message.ends_with(r#""evt.account.alice""#));
    }
}

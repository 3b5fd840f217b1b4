//! Sharing partitions between instances.
//!
//! Each partition's consumer delivers to one pinned instance at a time; the others wait on
//! standby and take over when it stops pulling. On its own, the first instance to start would
//! keep every pin. So every few seconds each instance counts the instances of its projection
//! (`$SRV.PING.<name>`) and, when it is busy on more than its fair share of partitions, hands the
//! surplus over: the worker stops pulling, the pin is released, and another instance's standby
//! pull takes it.
//!
//! A pin can also go to nobody. nats-server gives the pin to the first waiting pull request when
//! it has a message to deliver, and only then checks that the request's client still listens;
//! when it does not, the request is dropped but the pin stays. So an event that arrives while
//! the pull requests of instances that just stopped still wait at the server (until they expire,
//! half the pin timeout) pins a client that is gone, and every live instance waits out the pin
//! timeout. [`dead_pin`] recognizes such a pin, and standbys release it.

use super::Stats;
use async_nats::jetstream::consumer;
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Milliseconds since the epoch, for "last batch" stamps.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The most partitions one of `instances` instances should hold.
pub(crate) fn fair_share(partitions: u32, instances: usize) -> usize {
    (partitions as usize).div_ceil(instances.max(1))
}

pub(crate) async fn balance(
    client: async_nats::Client,
    name: &'static str,
    stats: Arc<Stats>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), crate::Error> {
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep(period) => {}
        }
        let instances = count_instances(&client, name).await;
        let fair = fair_share(stats.checkpoints.len() as u32, instances);
        let busy_since = now_ms().saturating_sub(2 * period.as_millis() as u64);
        let busy: Vec<usize> = stats
            .last_batch_ms
            .iter()
            .enumerate()
            .filter(|(_, at)| at.load(Ordering::Relaxed) >= busy_since)
            .map(|(partition, _)| partition)
            .collect();
        for &partition in busy.iter().skip(fair) {
            tracing::info!(
                projection = name,
                partition,
                instances,
                fair,
                "handing a partition to another instance"
            );
            if let Some(flag) = stats.hand_over.get(partition) {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// The pin of priority group `group` when nats-server gave it to a client that was gone: events
/// wait, yet nothing was delivered since the pin was given. A live client gets its first message
/// with the pin (the server gives the pin in order to deliver it), so a pin older than the last
/// delivery went nowhere.
pub(crate) fn dead_pin<'a>(info: &'a consumer::Info, group: &str) -> Option<&'a str> {
    if info.num_pending == 0 {
        return None;
    }
    let state = info
        .priority_groups
        .iter()
        .find(|state| state.group == group)?;
    let (pin, pinned_at) = (state.pinned_client_id.as_deref()?, state.pinned_ts?);
    let delivered_since = info
        .delivered
        .last_active
        .is_some_and(|delivered| delivered >= pinned_at);
    (!delivered_since).then_some(pin)
}

/// How many instances of the projection answer `$SRV.PING` (at least 1: this one).
async fn count_instances(client: &async_nats::Client, name: &str) -> usize {
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(inbox.clone()).await else {
        return 1;
    };
    if client
        .publish_with_reply(crate::wire::names::service_ping(name), inbox, "".into())
        .await
        .is_err()
    {
        return 1;
    }
    let mut count = 0;
    let window = tokio::time::sleep(Duration::from_millis(250));
    tokio::pin!(window);
    loop {
        tokio::select! {
            () = &mut window => break,
            reply = replies.next() => match reply {
                Some(_) => count += 1,
                None => break,
            },
        }
    }
    count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consumer info as nats-server 2.15 sends it, with `pending` events waiting, the pin given at
    /// `pinned` and the last delivery at `delivered` (RFC 3339, or null).
    fn consumer_info(
        pending: u64,
        pinned: Option<&str>,
        delivered: Option<&str>,
    ) -> consumer::Info {
        let group = match pinned {
            Some(at) => {
                serde_json::json!({"group": "jetfn", "pinned_client_id": "PIN", "pinned_ts": at})
            }
            None => serde_json::json!({"group": "jetfn", "pinned_ts": "0001-01-01T00:00:00Z"}),
        };
        serde_json::from_value(serde_json::json!({
            "stream_name": "S", "name": "C", "created": "2026-12-03T07:00:00Z",
            "config": consumer::Config::default(),
            "delivered": {"consumer_seq": 10, "stream_seq": 10, "last_active": delivered},
            "ack_floor": {"consumer_seq": 10, "stream_seq": 10},
            "num_ack_pending": 0, "num_redelivered": 0, "num_waiting": 1, "num_pending": pending,
            "priority_groups": [group],
            "ts": "2026-12-03T07:00:09Z"
        }))
        .unwrap_or_else(|e| panic!("consumer info: {e}"))
    }

    /// When the pin was given, and deliveries before and after it.
    const PINNED: &str = "2026-12-03T07:00:08Z";
    const DELIVERED_BEFORE: &str = "2026-12-03T07:00:07Z";
    const DELIVERED_AFTER: &str = "2026-12-03T07:00:08.5Z";

    #[test]
    fn a_pin_given_after_the_last_delivery_with_events_waiting_is_dead() {
        let info = consumer_info(5, Some(PINNED), Some(DELIVERED_BEFORE));
        assert_eq!(dead_pin(&info, "jetfn"), Some("PIN"));
        let never_delivered = consumer_info(5, Some(PINNED), None);
        assert_eq!(dead_pin(&never_delivered, "jetfn"), Some("PIN"));
    }

    #[test]
    fn a_pin_that_delivered_since_it_was_given_is_alive() {
        let info = consumer_info(5, Some(PINNED), Some(DELIVERED_AFTER));
        assert_eq!(dead_pin(&info, "jetfn"), None);
    }

    #[test]
    fn no_pin_no_waiting_events_or_another_group_is_not_a_dead_pin() {
        let unpinned = consumer_info(5, None, Some(DELIVERED_BEFORE));
        assert_eq!(dead_pin(&unpinned, "jetfn"), None);
        let drained = consumer_info(0, Some(PINNED), Some(DELIVERED_BEFORE));
        assert_eq!(dead_pin(&drained, "jetfn"), None);
        let pinned = consumer_info(5, Some(PINNED), Some(DELIVERED_BEFORE));
        assert_eq!(dead_pin(&pinned, "other"), None);
    }

    #[test]
    fn the_fair_share_rounds_up() {
        assert_eq!(fair_share(4, 2), 2);
        assert_eq!(fair_share(4, 3), 2);
        assert_eq!(fair_share(4, 1), 4);
        assert_eq!(fair_share(4, 8), 1);
        assert_eq!(fair_share(4, 0), 4);
    }
}

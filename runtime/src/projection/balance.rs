//! Sharing partitions between instances.
//!
//! Each partition's consumer delivers to one pinned instance at a time; the others wait on
//! standby and take over when it stops pulling. On its own, the first instance to start would
//! keep every pin. So every few seconds each instance counts the instances of its projection
//! (`$SRV.PING.<name>`) and, when it is busy on more than its fair share of partitions, hands the
//! surplus over: the worker stops pulling, the pin is released, and another instance's standby
//! pull takes it.

use super::Stats;
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

    #[test]
    fn the_fair_share_rounds_up() {
        assert_eq!(fair_share(4, 2), 2);
        assert_eq!(fair_share(4, 3), 2);
        assert_eq!(fair_share(4, 1), 4);
        assert_eq!(fair_share(4, 8), 1);
        assert_eq!(fair_share(4, 0), 4);
    }
}

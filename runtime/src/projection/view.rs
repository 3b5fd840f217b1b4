//! The partitioned view: how partitions read only their own events.
//!
//! With one partition a projection reads the event stream itself. With n > 1, every partition
//! would otherwise read the whole stream and skip the others' events (n deliveries per event).
//! Instead the projection reads a **mirror** of the event stream whose subject transform puts
//! the server's `partition(n, 1)` of the aggregate id into the subject
//! (`<prefix>.<id>` -> `<prefix>.<k>.<id>`), and partition k's consumer filters on
//! `<prefix>.<k>.*`: each event is delivered to one partition.
//!
//! A mirror keeps the origin's sequences (it stores each message at its origin sequence and
//! skips over gaps), so checkpoints, consistency tokens and the change feed's `seq` keep meaning
//! the event stream's sequence. It strips the origin's `Nats-Expected-*` and `Nats-Batch-*`
//! headers and does not deduplicate, so every event arrives once, as stored.
//!
//! The cost: the view stores every event a second time (with the event stream's limits), and the
//! server reads each event once more to fill it. Projections of the same aggregate type and
//! partition count share one view. In a stream several aggregate types share, the view mirrors
//! only this type's subjects (the mirror skips the others, keeping the sequences).

use super::{Context, Projection};
use crate::wire::names;
use crate::{Aggregate, Error};
use async_nats::jetstream::stream;

/// Creates the partitioned view of the projection's event stream if it does not exist, and
/// checks that an existing one mirrors that stream with the expected transform. Returns its name.
pub(crate) async fn provision<P: Projection>(
    context: &Context<P>,
    partitions: u32,
) -> Result<String, Error> {
    let aggregate = <P::Source as Aggregate>::NAME;
    let name = names::partition_view(&context.source.stream, aggregate, partitions);
    let (source, destination) =
        names::partition_view_transform(&context.source.subject_prefix, partitions);
    let expected = stream::Source {
        name: context.source.stream.clone(),
        subject_transforms: vec![stream::SubjectTransform {
            source: source.clone(),
            destination: destination.clone(),
        }],
        ..Default::default()
    };
    let js = &context.js;
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| Error::Service(format!("partitioned view {name}: {e}")))?;
            let mirror = info.config.mirror.as_ref();
            let same = mirror.is_some_and(|m| {
                m.name == expected.name && m.subject_transforms == expected.subject_transforms
            });
            if !same {
                return Err(Error::Service(format!(
                    "stream {name} exists but is not the partitioned view jetfn needs (a mirror \
                     of {} with subject transform {source} -> {destination}); delete it",
                    expected.name
                )));
            }
        }
        Err(_) => {
            let config = stream::Config {
                name: name.clone(),
                description: Some(format!(
                    "jetfn partitioned view of {} for projections with {partitions} partitions",
                    context.source.stream
                )),
                mirror: Some(expected),
                storage: stream::StorageType::File,
                num_replicas: context.config.stream.replicas,
                metadata: [(names::meta::PARTITIONS.to_owned(), partitions.to_string())].into(),
                ..Default::default()
            };
            if let Err(err) = js.create_stream(config).await {
                // Another instance may have created it at the same moment.
                if js.get_stream(&name).await.is_err() {
                    return Err(Error::Service(format!(
                        "creating partitioned view {name}: {err}"
                    )));
                }
            }
            tracing::info!(view = %name, stream = %context.source.stream, partitions, "partitioned view created");
        }
    }
    Ok(name)
}

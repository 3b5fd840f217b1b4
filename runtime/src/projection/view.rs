//! The partitioned view: how partitions read only their own events.
//!
//! With one partition a projection reads the event stream itself. With n > 1, every partition
//! would otherwise read the whole stream and skip the others' events (n deliveries per event).
//! Instead the projection reads a stream that **sources** the event stream with a subject
//! transform putting the server's `partition(n, 1)` of the aggregate id into the subject
//! (`<prefix>.<id>` -> `<prefix>.<k>.<id>`), and partition k's consumer filters on
//! `<prefix>.<k>.*`: each event is delivered to one partition.
//!
//! Not a mirror: a mirror of a stream with direct gets answers the origin's direct gets too
//! (the server turns `mirror_direct` on by itself), and with transformed subjects it answers
//! them wrongly, which breaks the command path's loads. A sourced stream numbers its messages
//! itself, but each carries the origin's sequence in its `Nats-Stream-Source` header: events,
//! checkpoints and consistency tokens keep the event stream's sequence, and only the consumer's
//! position is the view's (kept beside the delivery cursor). Sourcing strips the origin's
//! `Nats-Expected-*` and `Nats-Batch-*` headers; it deduplicates on `Nats-Msg-Id`, which jetfn
//! makes unique per event.
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
            let same = info.config.mirror.is_none()
                && matches!(info.config.sources.as_deref(), Some([only])
                    if only.name == expected.name
                        && only.subject_transforms == expected.subject_transforms);
            if !same {
                return Err(Error::Service(format!(
                    "stream {name} exists but is not the partitioned view jetfn needs (sourcing \
                     only {} with subject transform {source} -> {destination}); delete it",
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
                sources: Some(vec![expected]),
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

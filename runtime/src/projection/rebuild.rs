//! Rebuilding a read model without downtime.
//!
//! The new version `G+1` is written beside the live version `G` from the first event, by workers
//! in build mode. When every partition has caught up with the stream, `{P}:active` is set to
//! `G+1` in one step; live instances notice on their next batch and follow, through their own
//! consumers (`<projection>-p<k>`, whose names never change), recreated at the new version's
//! checkpoints; the build consumers (`<projection>-g<G+1>-p<k>`) are deleted. After
//! `projection.rebuild_grace` the old version's keys are deleted.

use super::worker::Worker;
use super::{Context, Projection, Stats};
use crate::Error;
use crate::wire::names;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How far a rebuild is, reported while it runs and once at the end (`done`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RebuildProgress {
    /// The version being built.
    pub generation: u64,
    /// The least checkpoint of the new version.
    pub reached: u64,
    /// The stream's last sequence.
    pub target: u64,
    /// Events applied per second so far.
    pub events_per_second: u64,
    /// The pointer has flipped and the old version is gone.
    pub done: bool,
}

pub(crate) async fn rebuild<P: Projection>(
    projection: Arc<P>,
    context: Context<P>,
    progress: impl Fn(RebuildProgress),
) -> Result<u64, Error> {
    let model = &context.model;
    let partitions = context.config.projection.partitions;
    let old = model.active_generation().await?.unwrap_or(0);
    let new = old + 1;
    // Leftovers of an interrupted rebuild of the same version start over.
    model.delete_generation(new).await?;
    delete_consumers(&context, P::NAME, new).await;
    tracing::info!(
        projection = P::NAME,
        from = old,
        to = new,
        "rebuilding read model"
    );

    let stats = Arc::new(Stats::new(partitions));
    // The build workers' claims follow the new version's progress stream.
    stats
        .generation
        .store(new, std::sync::atomic::Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    if context.source.view.is_some() {
        workers.spawn(super::follow_progress(
            context.model.clone(),
            stats.clone(),
            stop_rx.clone(),
        ));
    }
    for partition in 0..partitions {
        let worker = Worker::new(
            projection.clone(),
            context.clone(),
            partition,
            new,
            false,
            stats.clone(),
        );
        workers.spawn(worker.run(stop_rx.clone()));
    }

    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut final_report = loop {
        if let Some(Ok(Err(err))) = workers.try_join_next() {
            let _ = stop_tx.send(true);
            return Err(err);
        }
        let target = stream_last_seq(&context).await?;
        let checkpoints = model.checkpoints(new).await?;
        let reached = if checkpoints.len() < partitions as usize {
            0
        } else {
            checkpoints.iter().map(|(_, seq)| *seq).min().unwrap_or(0)
        };
        let rate = (reached as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64;
        let report = RebuildProgress {
            generation: new,
            reached,
            target,
            events_per_second: rate,
            done: false,
        };
        if reached >= target {
            break report;
        }
        if last_report.elapsed() >= Duration::from_millis(500) {
            tracing::info!(
                projection = P::NAME,
                reached,
                target,
                events_per_second = rate,
                "rebuilding"
            );
            progress(report);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    model.activate(new).await?;
    tracing::info!(
        projection = P::NAME,
        generation = new,
        "read model version switched"
    );
    let _ = stop_tx.send(true);
    while workers.join_next().await.is_some() {}
    // The live instances follow the new version through their own consumers
    // (`<projection>-p<k>`, recreated at its checkpoints): the build consumers are done.
    delete_consumers(&context, P::NAME, new).await;

    if old > 0 {
        tokio::time::sleep(context.config.projection.rebuild_grace).await;
        let deleted = model.delete_generation(old).await?;
        delete_consumers(&context, P::NAME, old).await;
        tracing::info!(
            projection = P::NAME,
            generation = old,
            keys = deleted,
            "old read model version deleted"
        );
    }
    final_report.done = true;
    progress(final_report);
    Ok(new)
}

async fn stream_last_seq<P>(context: &Context<P>) -> Result<u64, Error> {
    let mut stream = context
        .js
        .get_stream(&context.source.stream)
        .await
        .map_err(|e| Error::Service(format!("stream {}: {e}", context.source.stream)))?;
    let info = stream
        .info()
        .await
        .map_err(|e| Error::Service(format!("stream {}: {e}", context.source.stream)))?;
    Ok(info.state.last_sequence)
}

/// Deletes the consumers of every partition of a version (up to 1024, the partition limit).
async fn delete_consumers<P>(context: &Context<P>, projection: &str, generation: u64) {
    let Ok(stream) = context.js.get_stream(context.source.read_stream()).await else {
        return;
    };
    for partition in 0..1024 {
        let name = names::projection_consumer(projection, generation, partition);
        if stream.delete_consumer(&name).await.is_err()
            && partition >= context.config.projection.partitions
        {
            break;
        }
    }
}

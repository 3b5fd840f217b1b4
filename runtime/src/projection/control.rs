//! A projection instance as a NATS service: `$SRV.STATS` carries its lag and checkpoints, and
//! three endpoints (queue group `q`, so one instance answers each request) control it:
//!
//! * `jetfn.projection.<name>.status`: the same JSON as the stats data;
//! * `jetfn.projection.<name>.rebuild`: starts a rebuild in this instance and replies
//!   `{"started":true,"generation":G}`; progress is published on
//!   `jetfn.projection.<name>.rebuild.progress` as [`RebuildProgress`] JSON, ending with
//!   `"done":true`;
//! * `jetfn.projection.<name>.dlq.replay`: replays the dead letters, replies `{"replayed":n}`.
//!
//! Failures reply `{"error":"..."}`.

use super::rebuild::{self, RebuildProgress};
use super::{Context, Projection, Stats, dead_letters};
use crate::Error;
use crate::service::{Replies, Request, Service, ServiceSpec};
use crate::wire::names;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) async fn register<P: Projection>(
    projection: Arc<P>,
    context: Context<P>,
    stats: Arc<Stats>,
) -> Result<Service, Error> {
    let for_stats = stats.clone();
    let metadata = HashMap::from([
        (
            names::meta::KIND.to_owned(),
            names::KIND_PROJECTION.to_owned(),
        ),
        (
            names::meta::STREAM.to_owned(),
            context.source.stream.clone(),
        ),
        (
            names::meta::PARTITIONS.to_owned(),
            context.config.projection.partitions.to_string(),
        ),
        (
            names::meta::REDIS_TAG.to_owned(),
            format!("{{{}}}", P::NAME),
        ),
    ]);
    let spec = ServiceSpec {
        name: P::NAME.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        description: format!("jetfn projection {}", P::NAME),
        metadata,
        queue_group: names::QUEUE_GROUP.to_owned(),
        replies: Replies::new(&context.config.nats.reply_prefixes),
        stats: Arc::new(move || for_stats.to_json()),
    };
    let service = Service::start(&context.client, spec).await?;
    let endpoint =
        |name: &'static str, subject: String| service.endpoint(name, subject, HashMap::new());
    let subject = |action| names::projection_endpoint(P::NAME, action);
    let mut status = endpoint("status", subject(names::STATUS)).await?;
    let mut rebuilds = endpoint("rebuild", subject(names::REBUILD)).await?;
    let mut replays = endpoint("dlq-replay", subject(names::DLQ_REPLAY)).await?;

    tokio::spawn(async move {
        while let Some(request) = status.next().await {
            respond(&request, stats.to_json()).await;
        }
    });
    let rebuilding = Arc::new(AtomicBool::new(false));
    let (for_rebuild, for_replay) = (context.clone(), context);
    let projection_for_replay = projection.clone();
    tokio::spawn(async move {
        while let Some(request) = rebuilds.next().await {
            let reply = start_rebuild(projection.clone(), for_rebuild.clone(), &rebuilding).await;
            respond(&request, reply).await;
        }
    });
    tokio::spawn(async move {
        while let Some(request) = replays.next().await {
            let reply = match dead_letters::replay(&*projection_for_replay, &for_replay).await {
                Ok(replayed) => json!({ "replayed": replayed }),
                Err(err) => json!({ "error": err.to_string() }),
            };
            respond(&request, reply).await;
        }
    });
    Ok(service)
}

/// Starts a rebuild in the background unless one is running here.
async fn start_rebuild<P: Projection>(
    projection: Arc<P>,
    context: Context<P>,
    rebuilding: &Arc<AtomicBool>,
) -> serde_json::Value {
    if rebuilding.swap(true, Ordering::SeqCst) {
        return json!({ "error": format!("a rebuild of {} is already running", P::NAME) });
    }
    let generation = match context.model.active_generation().await {
        Ok(active) => active.unwrap_or(0) + 1,
        Err(err) => {
            rebuilding.store(false, Ordering::SeqCst);
            return json!({ "error": err.to_string() });
        }
    };
    let rebuilding = rebuilding.clone();
    tokio::spawn(async move {
        let client = context.client.clone();
        let subject = crate::wire::names::rebuild_progress(P::NAME);
        // One publisher, so progress reports arrive in order.
        let (reports, mut pending) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
        let publisher = tokio::spawn({
            let (client, subject) = (client.clone(), subject.clone());
            async move {
                while let Some(report) = pending.recv().await {
                    let body = serde_json::to_vec(&report).unwrap_or_default();
                    let _ = client.publish(subject.clone(), body.into()).await;
                }
                let _ = client.flush().await;
            }
        });
        let progress = {
            let reports = reports.clone();
            move |progress: RebuildProgress| {
                let _ = reports.send(serde_json::to_value(progress).unwrap_or_default());
            }
        };
        if let Err(err) = rebuild::rebuild(projection, context, progress).await {
            tracing::error!(projection = P::NAME, error = %err, "rebuild failed");
            let _ = reports.send(json!({ "error": err.to_string(), "done": true }));
        }
        drop(reports);
        let _ = publisher.await;
        rebuilding.store(false, Ordering::SeqCst);
    });
    json!({ "started": true, "generation": generation })
}

async fn respond(request: &Request, body: serde_json::Value) {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if let Err(err) = request.respond(bytes.into()).await {
        tracing::debug!(error = %err, "control reply not sent");
    }
}

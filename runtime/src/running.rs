//! What a running projection or process manager owns: its tasks, its service and its health
//! endpoint, and how it stops.

use crate::Error;
use crate::health::HealthServer;
use std::future::Future;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Background tasks that stop together when told to.
pub(crate) struct Tasks {
    pub stop: watch::Sender<bool>,
    pub tasks: JoinSet<Result<(), Error>>,
    pub service: Option<crate::service::Service>,
    pub health: Option<HealthServer>,
}

impl Tasks {
    /// Tells the tasks to stop, unregisters the service and waits for them; the last error
    /// wins. `what` names a task in the error of one that panicked.
    pub async fn stop(mut self, what: &str) -> Result<(), Error> {
        let _ = self.stop.send(true);
        if let Some(service) = self.service.take() {
            service.stop().await;
        }
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => result = Err(err),
                Err(err) => result = Err(Error::Service(format!("{what} failed: {err}"))),
            }
        }
        drop(self.health);
        result
    }

    /// Runs until `signal` (then logs `stopping` and stops as [`Tasks::stop`] does), or until
    /// a task fails for good (then returns its error).
    pub async fn stop_on(
        mut self,
        signal: impl Future<Output = ()>,
        stopping: &str,
        what: &str,
    ) -> Result<(), Error> {
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => {
                    tracing::info!("shutting down: {stopping}");
                    return self.stop(what).await;
                }
                Some(joined) = self.tasks.join_next() => {
                    if let Ok(Err(err)) = joined {
                        let _ = self.stop.send(true);
                        return Err(err);
                    }
                }
            }
        }
    }
}

/// A started function that can serve until a signal and then stop gracefully.
pub(crate) trait StopOnSignal {
    /// Serves until `signal` completes, then stops gracefully.
    fn stop_on(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), Error>>;
}

/// Installs logging and the SIGTERM/SIGINT handlers (before start-up, so a signal during it is
/// not lost), starts, serves until a signal, stops, and flushes exported spans: `run` of every
/// kind of function.
pub(crate) async fn run_until_signal<R: StopOnSignal>(
    start: impl Future<Output = Result<R, Error>>,
) -> Result<(), Error> {
    crate::telemetry::init();
    let signal = crate::telemetry::shutdown_signal();
    let running = start.await?;
    let stopped = running.stop_on(signal).await;
    crate::telemetry::shutdown();
    stopped
}

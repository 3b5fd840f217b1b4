//! Committing one batch: run the atomic apply step until it reaches an outcome, dead-letter the
//! events the read model refuses, wait out a Redis that is unavailable, and stop on anything
//! else. The step and the worker's side effects sit behind traits, so the loop is tested
//! deterministically against a fake Redis that fails on demand.

use crate::Error;
use crate::readmodel::{Applied, AppliedEvent, ReadModelError, Step};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first pause before retrying a batch while Redis is unavailable.
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between retries: a partition resumes within this of Redis's return.
pub(crate) const RETRY_MAX: Duration = Duration::from_millis(500);

/// One run of the atomic apply step over a batch's events (Redis in production).
pub(crate) trait ApplyStep {
    /// Runs the step once.
    fn apply(
        &self,
        events: &[AppliedEvent],
    ) -> impl Future<Output = Result<Step, ReadModelError>> + Send;
}

/// What the commit loop asks of the worker around it.
pub(crate) trait Around {
    /// Stores `event` (the batch's `index`-th) as a dead letter because the read model refused
    /// it for `reason`.
    fn dead_letter(
        &mut self,
        index: usize,
        event: &AppliedEvent,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Tells JetStream the batch is still being worked on (progress acks).
    fn in_progress(&mut self) -> impl Future<Output = ()> + Send;

    /// Redis was unavailable on attempt `attempts`; the next try follows after `pause`.
    fn unavailable(&mut self, error: &ReadModelError, attempts: u32, pause: Duration);

    /// The step failed in a way waiting cannot cure.
    fn failed(&mut self, error: &ReadModelError);
}

/// Runs `step` over `events` until it reaches an outcome. A refused event is dead-lettered and
/// left out (it then only advances the checkpoint); a transient error is retried after a pause
/// of 50 ms doubling to 500 ms, with [`Around::in_progress`] every `progress_every`; any other
/// error is returned at once, so that a step is never repeated blindly.
pub(crate) async fn commit(
    step: &impl ApplyStep,
    around: &mut impl Around,
    events: &mut [AppliedEvent],
    progress_every: Duration,
) -> Result<(Applied, u32), Error> {
    let mut pause = RETRY_FIRST;
    let mut attempts = 0u32;
    let mut last_progress = Instant::now();
    loop {
        match step.apply(events).await {
            Ok(Step::Done(applied)) => return Ok((applied, attempts)),
            Ok(Step::Refused { seq, reason }) => {
                let Some(index) = events.iter().position(|e| e.seq == seq && e.write) else {
                    let error = ReadModelError::UnexpectedReply(format!(
                        "refused {seq}, which is not an event of the batch"
                    ));
                    around.failed(&error);
                    return Err(error.into());
                };
                around.dead_letter(index, &events[index], &reason).await?;
                events[index].write = false;
                events[index].ops = Arc::default();
            }
            Err(error) if error.is_transient() => {
                attempts += 1;
                around.unavailable(&error, attempts, pause);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
                // Keep JetStream from redelivering what is still being applied.
                if last_progress.elapsed() >= progress_every {
                    last_progress = Instant::now();
                    around.in_progress().await;
                }
            }
            Err(error) => {
                around.failed(&error);
                return Err(error.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A Redis that answers from a script of replies, recording which events each run wrote.
    #[derive(Default)]
    struct FakeRedis {
        replies: Mutex<VecDeque<Result<Step, ReadModelError>>>,
        runs: Mutex<Vec<Vec<(u64, bool)>>>,
    }

    impl FakeRedis {
        fn answering(replies: impl IntoIterator<Item = Result<Step, ReadModelError>>) -> Self {
            FakeRedis {
                replies: Mutex::new(replies.into_iter().collect()),
                runs: Mutex::default(),
            }
        }

        fn runs(&self) -> Vec<Vec<(u64, bool)>> {
            self.runs
                .lock()
                .map(|runs| runs.clone())
                .unwrap_or_default()
        }
    }

    impl ApplyStep for FakeRedis {
        fn apply(
            &self,
            events: &[AppliedEvent],
        ) -> impl Future<Output = Result<Step, ReadModelError>> + Send {
            if let Ok(mut runs) = self.runs.lock() {
                runs.push(events.iter().map(|e| (e.seq, e.write)).collect());
            }
            let reply = self
                .replies
                .lock()
                .ok()
                .and_then(|mut replies| replies.pop_front())
                .unwrap_or_else(|| Err(ReadModelError::UnexpectedReply("no more replies".into())));
            async move { reply }
        }
    }

    /// Records what the loop asked of the worker.
    #[derive(Default)]
    struct Recorder {
        dead_letters: Vec<(usize, u64, String)>,
        progress: u32,
        unavailable: Vec<u32>,
        failed: Vec<String>,
    }

    impl Around for Recorder {
        fn dead_letter(
            &mut self,
            index: usize,
            event: &AppliedEvent,
            reason: &str,
        ) -> impl Future<Output = Result<(), Error>> + Send {
            self.dead_letters
                .push((index, event.seq, reason.to_owned()));
            async { Ok(()) }
        }

        fn in_progress(&mut self) -> impl Future<Output = ()> + Send {
            self.progress += 1;
            async {}
        }

        fn unavailable(&mut self, _error: &ReadModelError, attempts: u32, _pause: Duration) {
            self.unavailable.push(attempts);
        }

        fn failed(&mut self, error: &ReadModelError) {
            self.failed.push(error.to_string());
        }
    }

    fn events(seqs: &[u64]) -> Vec<AppliedEvent> {
        seqs.iter()
            .map(|&seq| AppliedEvent {
                seq,
                aggregate_id: "a".into(),
                event_type: "Added".into(),
                ops: Arc::default(),
                write: true,
            })
            .collect()
    }

    fn redis_down() -> Result<Step, ReadModelError> {
        Err(ReadModelError::Redis(redis::RedisError::from(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "redis is down"),
        )))
    }

    fn committed(seq: u64) -> Result<Step, ReadModelError> {
        Ok(Step::Done(Applied::Committed(seq)))
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_redis_is_retried_until_it_commits_with_progress_while_waiting() {
        let redis = FakeRedis::answering((0..10).map(|_| redis_down()).chain([committed(3)]));
        let mut around = Recorder::default();
        let mut batch = events(&[1, 2, 3]);
        let started = Instant::now();
        let (applied, attempts) = commit(&redis, &mut around, &mut batch, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(applied, Applied::Committed(3));
        assert_eq!(attempts, 10);
        assert_eq!(around.unavailable, (1..=10).collect::<Vec<_>>());
        assert_eq!(redis.runs().len(), 11);
        // 50 + 100 + 200 + 400 + 6 x 500 ms: the pauses never exceed 500 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(3750));
        assert_eq!(around.progress, 3, "progress acks about once a second");
        assert!(around.dead_letters.is_empty() && around.failed.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_event_is_dead_lettered_and_the_batch_applied_without_it() {
        let redis = FakeRedis::answering([
            Ok(Step::Refused {
                seq: 2,
                reason: "HINCRBY totals sum 1 would overflow".into(),
            }),
            committed(3),
        ]);
        let mut around = Recorder::default();
        let mut batch = events(&[1, 2, 3]);
        let (applied, _) = commit(&redis, &mut around, &mut batch, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(applied, Applied::Committed(3));
        assert_eq!(
            around.dead_letters,
            [(1, 2, "HINCRBY totals sum 1 would overflow".to_owned())]
        );
        assert_eq!(
            redis.runs(),
            [
                vec![(1, true), (2, true), (3, true)],
                vec![(1, true), (2, false), (3, true)]
            ]
        );
    }

    /// Commits a one-event batch (seq 1) against `replies`.
    async fn commit_one(
        replies: impl IntoIterator<Item = Result<Step, ReadModelError>>,
    ) -> (Result<(Applied, u32), Error>, FakeRedis, Recorder) {
        let redis = FakeRedis::answering(replies);
        let mut around = Recorder::default();
        let mut batch = events(&[1]);
        let result = commit(&redis, &mut around, &mut batch, Duration::from_secs(1)).await;
        (result, redis, around)
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_waiting_cannot_cure_is_never_retried() {
        let (result, redis, around) = commit_one([
            Err(ReadModelError::Inconsistent {
                projection: "p".into(),
                generation: 1,
                message: "a write failed half-way".into(),
            }),
            committed(1),
        ])
        .await;
        assert!(
            matches!(
                result,
                Err(Error::Redis(ReadModelError::Inconsistent { .. }))
            ),
            "{result:?}"
        );
        assert_eq!(redis.runs().len(), 1, "the step must not run again");
        assert_eq!(around.failed.len(), 1);
        assert!(around.unavailable.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_of_an_event_outside_the_batch_is_an_error() {
        let (result, _, around) = commit_one([Ok(Step::Refused {
            seq: 9,
            reason: "?".into(),
        })])
        .await;
        assert!(
            matches!(
                result,
                Err(Error::Redis(ReadModelError::UnexpectedReply(_)))
            ),
            "{result:?}"
        );
        assert!(around.dead_letters.is_empty());
    }
}

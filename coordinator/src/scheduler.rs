//! The scheduler: a pure state machine over the trials of the sweeps being served. It has no
//! I/O and no clock of its own; the service feeds it events (a lease request, a heartbeat,
//! an epoch report, a finish report, the passing of time) with the current time in
//! milliseconds, and persists the [`Transition`]s it returns before answering the worker.
//!
//! A trial is pending, running under one attempt, succeeded or failed. Every lease starts a
//! new attempt whose number fences reports: a report that does not carry the trial's current
//! attempt, from the worker that holds it, changes nothing. An attempt ends in one of four
//! ways, each with its own retry rule:
//!
//! - **succeeded**: the trial is done and is never leased again;
//! - **failed** by the trial itself: retried until `max_failures` failures, then the trial
//!   ends as failed with the last error;
//! - **invalid**: the spec cannot run anywhere, so the trial fails at once;
//! - **preempted** (the worker was asked to stop) or **lost** (its lease expired, plus a
//!   grace period): the trial goes back to pending. Preemptions never count; losses count
//!   against `max_lost`, so a trial that kills every worker it lands on ends as failed.

use std::collections::{BTreeMap, VecDeque};

/// The timing and retry rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long a lease lasts without a heartbeat, in milliseconds.
    pub lease_ms: u64,
    /// Extra time after expiry before an attempt is declared lost.
    pub grace_ms: u64,
    /// Failures of the trial itself before it ends as failed.
    pub max_failures: u32,
    /// Lost attempts before the trial ends as failed.
    pub max_lost: u32,
    /// How long a worker with nothing to do waits before asking again.
    pub retry_after_ms: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            lease_ms: 60_000,
            grace_ms: 10_000,
            max_failures: 3,
            max_lost: 5,
            retry_after_ms: 1_000,
        }
    }
}

/// Where a trial stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialState {
    /// Waiting for a worker.
    Pending,
    /// Leased to `worker` under `attempt` until `expires_ms`.
    Running {
        /// The current attempt number.
        attempt: u32,
        /// The worker holding the lease.
        worker: String,
        /// When the lease runs out unless renewed.
        expires_ms: u64,
    },
    /// Trained and evaluated; its result is stored.
    Succeeded,
    /// Given up on, with the last error.
    Failed {
        /// The error of the last attempt.
        error: String,
    },
}

impl TrialState {
    /// The state's name as stored and shown.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running { .. } => "running",
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
        }
    }

    /// Whether the trial will never run again.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed { .. })
    }
}

/// One trial as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialEntry {
    /// Its state.
    pub state: TrialState,
    /// The number of the last attempt started (0: never leased).
    pub attempts: u32,
    /// Attempts that failed by the trial's own fault.
    pub failures: u32,
    /// Attempts lost with their worker.
    pub lost: u32,
}

impl TrialEntry {
    /// A trial never leased.
    pub fn new() -> Self {
        Self {
            state: TrialState::Pending,
            attempts: 0,
            failures: 0,
            lost: 0,
        }
    }
}

impl Default for TrialEntry {
    fn default() -> Self {
        Self::new()
    }
}

/// How an attempt ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Trained and evaluated with these metrics.
    Succeeded {
        /// Metric name and value.
        metrics: BTreeMap<String, f64>,
        /// Wall-clock seconds of the attempt.
        wall_seconds: f64,
    },
    /// The trial itself failed.
    Failed(String),
    /// The spec cannot run anywhere.
    Invalid(String),
    /// The worker was asked to stop; the trial should resume elsewhere.
    Preempted,
}

/// How an attempt ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Success.
    Succeeded,
    /// Failure of the trial itself.
    Failed,
    /// Invalid spec.
    Invalid,
    /// Released by a draining worker.
    Preempted,
    /// Its lease expired.
    Lost,
}

impl AttemptEnd {
    /// The name as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Invalid => "invalid",
            Self::Preempted => "preempted",
            Self::Lost => "lost",
        }
    }
}

/// A change the service must persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// A new attempt started.
    Leased {
        /// The trial.
        trial: String,
        /// The new attempt's number.
        attempt: u32,
        /// The worker.
        worker: String,
        /// The lease's expiry.
        expires_ms: u64,
    },
    /// An attempt ended; `state` is the trial's state afterwards.
    Ended {
        /// The trial.
        trial: String,
        /// The attempt.
        attempt: u32,
        /// How it ended.
        end: AttemptEnd,
        /// The error, for failures and losses.
        error: Option<String>,
        /// The trial's new state.
        state: TrialState,
        /// The metrics, for a success.
        result: Option<(BTreeMap<String, f64>, f64)>,
    },
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Run this attempt.
    Granted {
        /// The trial.
        trial: String,
        /// The attempt number to carry in every report.
        attempt: u32,
        /// When the lease expires unless renewed.
        expires_ms: u64,
    },
    /// Nothing to hand out now; ask again after this many milliseconds.
    Wait(u32),
    /// Every trial is finished.
    Done,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No such trial is being served.
    #[error("unknown trial {0}")]
    UnknownTrial(String),
    /// The attempt is not the trial's current one, or not this worker's.
    #[error("attempt {attempt} of trial {trial} is not current (the trial is {state})")]
    Stale {
        /// The trial.
        trial: String,
        /// The attempt the report carried.
        attempt: u32,
        /// The trial's state now.
        state: &'static str,
    },
}

/// The trials being served and their states.
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: Policy,
    trials: BTreeMap<String, TrialEntry>,
    /// Pending trials in the order they are handed out.
    queue: VecDeque<String>,
}

impl Scheduler {
    /// No trials yet.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            trials: BTreeMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Serves a trial in `entry`'s state; called in sweep order. A trial already served keeps
    /// its state. A running trial restored from the store keeps its attempt with a fresh lease
    /// from `now_ms`, so that a worker still running it after a coordinator restart can go on.
    pub fn add(&mut self, trial: &str, mut entry: TrialEntry, now_ms: u64) {
        if self.trials.contains_key(trial) {
            return;
        }
        match &mut entry.state {
            TrialState::Pending => self.queue.push_back(trial.to_owned()),
            TrialState::Running { expires_ms, .. } => *expires_ms = now_ms + self.policy.lease_ms,
            TrialState::Succeeded | TrialState::Failed { .. } => {}
        }
        self.trials.insert(trial.to_owned(), entry);
    }

    /// A trial's entry.
    pub fn get(&self, trial: &str) -> Option<&TrialEntry> {
        self.trials.get(trial)
    }

    /// Every trial and its entry, by id.
    pub fn trials(&self) -> impl Iterator<Item = (&str, &TrialEntry)> {
        self.trials.iter().map(|(id, entry)| (id.as_str(), entry))
    }

    /// Whether every trial is succeeded or failed.
    pub fn is_done(&self) -> bool {
        self.trials.values().all(|t| t.state.is_terminal())
    }

    /// A worker asks for work: the first pending trial, in sweep order.
    pub fn lease(&mut self, worker: &str, now_ms: u64) -> (LeaseDecision, Option<Transition>) {
        while let Some(trial) = self.queue.pop_front() {
            let Some(entry) = self.trials.get_mut(&trial) else {
                continue;
            };
            if entry.state != TrialState::Pending {
                continue;
            }
            entry.attempts += 1;
            let expires_ms = now_ms + self.policy.lease_ms;
            entry.state = TrialState::Running {
                attempt: entry.attempts,
                worker: worker.to_owned(),
                expires_ms,
            };
            let transition = Transition::Leased {
                trial: trial.clone(),
                attempt: entry.attempts,
                worker: worker.to_owned(),
                expires_ms,
            };
            let decision = LeaseDecision::Granted {
                trial,
                attempt: entry.attempts,
                expires_ms,
            };
            return (decision, Some(transition));
        }
        if self.is_done() {
            (LeaseDecision::Done, None)
        } else {
            (LeaseDecision::Wait(self.policy.retry_after_ms), None)
        }
    }

    /// Checks that `attempt` is the running attempt of `trial`, held by `worker`, and renews
    /// its lease from `now_ms`.
    pub fn renew(
        &mut self,
        worker: &str,
        trial: &str,
        attempt: u32,
        now_ms: u64,
    ) -> Result<u64, Rejection> {
        let lease_ms = self.policy.lease_ms;
        let entry = self
            .trials
            .get_mut(trial)
            .ok_or_else(|| Rejection::UnknownTrial(trial.to_owned()))?;
        match &mut entry.state {
            TrialState::Running {
                attempt: current,
                worker: holder,
                expires_ms,
            } if *current == attempt && holder == worker => {
                *expires_ms = now_ms + lease_ms;
                Ok(*expires_ms)
            }
            state => Err(Rejection::Stale {
                trial: trial.to_owned(),
                attempt,
                state: state.name(),
            }),
        }
    }

    /// A worker's heartbeat over the attempts it runs: renews the current ones and returns
    /// the others, which the worker must abandon.
    pub fn heartbeat(
        &mut self,
        worker: &str,
        attempts: &[(String, u32)],
        now_ms: u64,
    ) -> Vec<(String, u32)> {
        attempts
            .iter()
            .filter(|(trial, attempt)| self.renew(worker, trial, *attempt, now_ms).is_err())
            .cloned()
            .collect()
    }

    /// The end of an attempt, as its worker reports it.
    pub fn finish(
        &mut self,
        worker: &str,
        trial: &str,
        attempt: u32,
        outcome: Outcome,
        now_ms: u64,
    ) -> Result<Transition, Rejection> {
        self.renew(worker, trial, attempt, now_ms)?;
        let policy = self.policy;
        let entry = self.trials.get_mut(trial).expect("renewed above");
        let (end, error, result) = match outcome {
            Outcome::Succeeded {
                metrics,
                wall_seconds,
            } => {
                entry.state = TrialState::Succeeded;
                (AttemptEnd::Succeeded, None, Some((metrics, wall_seconds)))
            }
            Outcome::Failed(error) => {
                entry.failures += 1;
                entry.state = if entry.failures >= policy.max_failures {
                    TrialState::Failed {
                        error: format!("{error} (failed {} times)", entry.failures),
                    }
                } else {
                    TrialState::Pending
                };
                (AttemptEnd::Failed, Some(error), None)
            }
            Outcome::Invalid(error) => {
                entry.state = TrialState::Failed {
                    error: error.clone(),
                };
                (AttemptEnd::Invalid, Some(error), None)
            }
            Outcome::Preempted => {
                entry.state = TrialState::Pending;
                (AttemptEnd::Preempted, None, None)
            }
        };
        let state = entry.state.clone();
        if state == TrialState::Pending {
            // A retried trial goes to the front: it may hold a checkpoint worth resuming.
            self.queue.push_front(trial.to_owned());
        }
        Ok(Transition::Ended {
            trial: trial.to_owned(),
            attempt,
            end,
            error,
            state,
            result,
        })
    }

    /// The passing of time: attempts whose lease ran out more than the grace period ago are
    /// lost, and their trials go back to pending (or fail after `max_lost` losses).
    pub fn expire(&mut self, now_ms: u64) -> Vec<Transition> {
        let policy = self.policy;
        let mut transitions = Vec::new();
        for (trial, entry) in &mut self.trials {
            let TrialState::Running {
                attempt,
                worker,
                expires_ms,
            } = &entry.state
            else {
                continue;
            };
            if now_ms <= expires_ms + policy.grace_ms {
                continue;
            }
            let (attempt, worker) = (*attempt, worker.clone());
            entry.lost += 1;
            let error = format!("worker {worker} stopped renewing its lease");
            entry.state = if entry.lost >= policy.max_lost {
                TrialState::Failed {
                    error: format!("{error}; lost {} times", entry.lost),
                }
            } else {
                self.queue.push_front(trial.clone());
                TrialState::Pending
            };
            transitions.push(Transition::Ended {
                trial: trial.clone(),
                attempt,
                end: AttemptEnd::Lost,
                error: Some(error),
                state: entry.state.clone(),
                result: None,
            });
        }
        transitions
    }

    /// The earliest instant at which [`Scheduler::expire`] could change something.
    pub fn next_expiry(&self) -> Option<u64> {
        self.trials
            .values()
            .filter_map(|t| match t.state {
                TrialState::Running { expires_ms, .. } => Some(expires_ms + self.policy.grace_ms),
                _ => None,
            })
            .min()
    }

    /// Trial counts by state name: pending, running, succeeded, failed.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for entry in self.trials.values() {
            match entry.state {
                TrialState::Pending => counts.pending += 1,
                TrialState::Running { .. } => counts.running += 1,
                TrialState::Succeeded => counts.succeeded += 1,
                TrialState::Failed { .. } => counts.failed += 1,
            }
        }
        counts
    }
}

/// Trials by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for a worker.
    pub pending: usize,
    /// Leased.
    pub running: usize,
    /// Done with a result.
    pub succeeded: usize,
    /// Given up on.
    pub failed: usize,
}

impl Counts {
    /// All trials.
    pub fn total(&self) -> usize {
        self.pending + self.running + self.succeeded + self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            lease_ms: 100,
            grace_ms: 10,
            max_failures: 2,
            max_lost: 3,
            retry_after_ms: 5,
        }
    }

    fn scheduler(trials: &[&str]) -> Scheduler {
        let mut s = Scheduler::new(policy());
        for t in trials {
            s.add(t, TrialEntry::new(), 0);
        }
        s
    }

    fn granted(decision: LeaseDecision) -> (String, u32) {
        match decision {
            LeaseDecision::Granted { trial, attempt, .. } => (trial, attempt),
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    fn success() -> Outcome {
        Outcome::Succeeded {
            metrics: BTreeMap::from([("test_accuracy".to_owned(), 0.5)]),
            wall_seconds: 1.0,
        }
    }

    #[test]
    fn trials_are_leased_once_each_in_order_then_done() {
        let mut s = scheduler(&["a", "b"]);
        let (a, _) = granted(s.lease("w1", 0).0);
        let (b, _) = granted(s.lease("w2", 0).0);
        assert_eq!((a.as_str(), b.as_str()), ("a", "b"));
        assert_eq!(s.lease("w3", 0).0, LeaseDecision::Wait(5));
        s.finish("w1", "a", 1, success(), 1).unwrap();
        s.finish("w2", "b", 1, success(), 1).unwrap();
        assert_eq!(s.lease("w3", 2).0, LeaseDecision::Done);
        assert!(s.is_done());
    }

    #[test]
    fn a_lost_attempt_is_leased_again_and_its_late_report_is_rejected() {
        let mut s = scheduler(&["a"]);
        granted(s.lease("w1", 0).0);
        // Not lost before expiry plus grace (100 + 10).
        assert!(s.expire(110).is_empty());
        assert_eq!(s.next_expiry(), Some(110));
        let lost = s.expire(111);
        assert!(matches!(
            &lost[..],
            [Transition::Ended {
                end: AttemptEnd::Lost,
                state: TrialState::Pending,
                ..
            }]
        ));
        let (_, attempt) = granted(s.lease("w2", 120).0);
        assert_eq!(attempt, 2);
        // The first worker comes back with a result for attempt 1: refused, nothing changes.
        let stale = s.finish("w1", "a", 1, success(), 130);
        assert!(matches!(stale, Err(Rejection::Stale { attempt: 1, .. })));
        assert!(matches!(
            s.get("a").unwrap().state,
            TrialState::Running { attempt: 2, .. }
        ));
        // Its heartbeat is told to stop; the current holder's is renewed.
        assert_eq!(
            s.heartbeat("w1", &[("a".into(), 1)], 130),
            vec![("a".into(), 1)]
        );
        assert!(s.heartbeat("w2", &[("a".into(), 2)], 130).is_empty());
        s.finish("w2", "a", 2, success(), 140).unwrap();
        assert_eq!(s.get("a").unwrap().state, TrialState::Succeeded);
        // A success is final: even the current holder cannot report twice.
        assert!(s.finish("w2", "a", 2, success(), 150).is_err());
    }

    #[test]
    fn heartbeats_keep_a_lease_alive() {
        let mut s = scheduler(&["a"]);
        granted(s.lease("w1", 0).0);
        for now in (50..1000).step_by(50) {
            assert!(s.heartbeat("w1", &[("a".into(), 1)], now).is_empty());
            assert!(s.expire(now).is_empty());
        }
        assert_eq!(s.expire(950 + 111).len(), 1);
    }

    #[test]
    fn a_worker_cannot_report_for_another_workers_attempt() {
        let mut s = scheduler(&["a"]);
        granted(s.lease("w1", 0).0);
        assert!(s.finish("w2", "a", 1, success(), 1).is_err());
        assert!(s.finish("w1", "zzz", 1, success(), 1).is_err());
    }

    #[test]
    fn failures_are_retried_up_to_the_limit_and_keep_the_error() {
        let mut s = scheduler(&["a"]);
        for attempt in 1..=2 {
            let (_, got) = granted(s.lease("w", 0).0);
            assert_eq!(got, attempt);
            s.finish(
                "w",
                "a",
                attempt,
                Outcome::Failed("NaN at step 3".into()),
                1,
            )
            .unwrap();
        }
        match &s.get("a").unwrap().state {
            TrialState::Failed { error } => assert!(error.contains("NaN at step 3"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.lease("w", 2).0, LeaseDecision::Done);
    }

    #[test]
    fn preemptions_do_not_count_but_losses_do() {
        let mut s = scheduler(&["a"]);
        for attempt in 1..=10 {
            granted(s.lease("w", 0).0);
            s.finish("w", "a", attempt, Outcome::Preempted, 1).unwrap();
        }
        assert_eq!(s.get("a").unwrap().state, TrialState::Pending);
        let mut now = 0;
        for _ in 0..3 {
            granted(s.lease("w", now).0);
            now += 200;
            s.expire(now);
        }
        assert!(matches!(
            s.get("a").unwrap().state,
            TrialState::Failed { .. }
        ));
    }

    #[test]
    fn an_invalid_trial_fails_at_once() {
        let mut s = scheduler(&["a"]);
        granted(s.lease("w", 0).0);
        let t = s
            .finish("w", "a", 1, Outcome::Invalid("k < 1".into()), 1)
            .unwrap();
        assert!(matches!(
            t,
            Transition::Ended {
                end: AttemptEnd::Invalid,
                ..
            }
        ));
        assert!(s.is_done());
    }

    #[test]
    fn a_restored_running_trial_gets_a_fresh_lease_and_keeps_its_attempt() {
        let mut s = Scheduler::new(policy());
        let entry = TrialEntry {
            state: TrialState::Running {
                attempt: 4,
                worker: "w".into(),
                expires_ms: 5,
            },
            attempts: 4,
            failures: 0,
            lost: 0,
        };
        s.add("a", entry, 1000);
        assert!(s.expire(1000).is_empty());
        assert!(s.heartbeat("w", &[("a".into(), 4)], 1050).is_empty());
        s.finish("w", "a", 4, success(), 1060).unwrap();
        // Terminal trials restored from the store are never leased.
        let mut s2 = Scheduler::new(policy());
        s2.add(
            "a",
            TrialEntry {
                state: TrialState::Succeeded,
                ..TrialEntry::new()
            },
            0,
        );
        assert_eq!(s2.lease("w", 0).0, LeaseDecision::Done);
    }

    /// Many workers racing for leases, with random losses, failures and preemptions: every
    /// trial ends, and each succeeded trial was accepted as succeeded exactly once.
    #[test]
    fn random_event_storms_end_with_each_trial_succeeded_once() {
        use rand::{Rng, SeedableRng};
        for seed in 0..20 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let ids: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
            let mut s = Scheduler::new(Policy {
                max_lost: 1000,
                max_failures: 1000,
                ..policy()
            });
            for id in &ids {
                s.add(id, TrialEntry::new(), 0);
            }
            let mut held: Vec<(String, String, u32)> = Vec::new();
            let mut successes: BTreeMap<String, u32> = BTreeMap::new();
            let mut now = 0;
            for _ in 0..100_000 {
                if s.is_done() {
                    break;
                }
                now += rng.random_range(0..20);
                match rng.random_range(0..6) {
                    0 | 1 => {
                        let worker = format!("w{}", rng.random_range(0..8));
                        if let (LeaseDecision::Granted { trial, attempt, .. }, _) =
                            s.lease(&worker, now)
                        {
                            held.push((worker, trial, attempt));
                        }
                    }
                    2 if !held.is_empty() => {
                        let (w, t, a) = held.swap_remove(rng.random_range(0..held.len()));
                        let outcome = match rng.random_range(0..4) {
                            0 => Outcome::Failed("x".into()),
                            1 => Outcome::Preempted,
                            _ => success(),
                        };
                        let ok = matches!(outcome, Outcome::Succeeded { .. });
                        if s.finish(&w, &t, a, outcome, now).is_ok() && ok {
                            *successes.entry(t).or_default() += 1;
                        }
                    }
                    3 => {
                        s.expire(now);
                    }
                    4 if !held.is_empty() => {
                        let i = rng.random_range(0..held.len());
                        let (w, t, a) = held[i].clone();
                        s.heartbeat(&w, &[(t, a)], now);
                    }
                    _ => {}
                }
            }
            assert!(s.is_done(), "seed {seed}");
            // A success is counted once and only for a trial that ends succeeded; a trial
            // that ran out of retries has none.
            for (id, entry) in s.trials() {
                let n = successes.get(id).copied().unwrap_or(0);
                let expected = u32::from(entry.state == TrialState::Succeeded);
                assert_eq!(n, expected, "seed {seed}, trial {id}: {entry:?}");
            }
            assert!(
                successes.len() > ids.len() / 2,
                "seed {seed}: {}",
                successes.len()
            );
        }
    }
}

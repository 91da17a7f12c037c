//! `coordinator status`: what the store says about each sweep: trial counts by state, the
//! running trials with their worker and epoch, and the most recent failed or lost attempts
//! with their error.

use std::fmt::Write as _;

use lvm_core::spec::TrialSpec;

use crate::store::{Store, StoreError};

/// How many failed attempts to list per sweep.
const RECENT_FAILURES: usize = 10;

fn describe(spec_json: &str) -> String {
    match serde_json::from_str::<TrialSpec>(spec_json) {
        Ok(s) => match s.hyper.bits {
            Some(bits) => format!("{} D={bits} {} seed {}", s.task, s.estimator, s.seed),
            None => format!("{} {} seed {}", s.task, s.estimator, s.seed),
        },
        Err(_) => "(unreadable spec)".into(),
    }
}

/// The status text of `sweeps` (every stored sweep when empty).
pub fn render(store: &Store, sweeps: &[String]) -> Result<String, StoreError> {
    let names = if sweeps.is_empty() {
        store.sweeps()?
    } else {
        for name in sweeps {
            store.require_sweep(name)?;
        }
        sweeps.to_vec()
    };
    let mut out = String::new();
    if names.is_empty() {
        let _ = writeln!(out, "no sweeps in {}", store.path().display());
    }
    for name in names {
        let trials = store.trials(&name)?;
        let count = |state: &str| trials.iter().filter(|t| t.state == state).count();
        let _ = writeln!(
            out,
            "sweep {name}: {} trials: {} succeeded, {} running, {} failed, {} pending",
            trials.len(),
            count("succeeded"),
            count("running"),
            count("failed"),
            count("pending")
        );
        for t in trials.iter().filter(|t| t.state == "running") {
            let worker = t.worker.clone().unwrap_or_default();
            let _ = writeln!(
                out,
                "  running  {}  {}  attempt {}  worker {worker}  epochs done {}",
                t.id,
                describe(&t.spec_json),
                t.attempts,
                t.epochs
            );
        }
        for t in trials.iter().filter(|t| t.state == "failed") {
            let _ = writeln!(
                out,
                "  failed   {}  {}  {}",
                t.id,
                describe(&t.spec_json),
                t.error.as_deref().unwrap_or("")
            );
        }
        let attempts = store.attempts(&name)?;
        let bad: Vec<_> = attempts
            .iter()
            .filter(|a| matches!(a.outcome.as_deref(), Some("failed" | "lost" | "invalid")))
            .collect();
        if !bad.is_empty() {
            let _ = writeln!(out, "  recent failed attempts:");
            for a in bad.iter().rev().take(RECENT_FAILURES) {
                let _ = writeln!(
                    out,
                    "    {} attempt {} on {}: {}: {}",
                    a.trial,
                    a.attempt,
                    a.worker,
                    a.outcome.as_deref().unwrap_or(""),
                    a.error.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(out)
}

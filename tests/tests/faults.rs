//! Faults a sweep must survive, with the real binaries over loopback: a worker drained by
//! SIGTERM hands its trial back at an epoch boundary, and the trial resumes from that
//! checkpoint on another worker with the metrics of an uninterrupted run.

use std::process::Command;
use std::time::{Duration, Instant};

use coordinator::store::Store;
use lvm_sweep_tests::harness::{Proc, binaries, data_dir, serve, worker};

#[test]
fn a_drained_worker_hands_back_its_trial_which_resumes_with_identical_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("drain.yaml");
    std::fs::write(
        &sweep,
        "name: drain\n\
         defaults: {epochs: 3, test_limit: 16}\n\
         experiments:\n\
         \x20 - task: signal_game\n\
         \x20   seeds: [1]\n\
         \x20   estimators: {sfe: {batch_size: 16}}\n",
    )
    .unwrap();
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &[]);
    let mut first = Proc::spawn(worker(port, &["--name", "first"]));
    // Wait for the first epoch's report, then ask the worker to drain.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let trials = Store::open(&db).unwrap().trials("drain").unwrap();
        if trials[0].epochs >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no epoch was reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = first.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = first.wait(Duration::from_secs(120));
    assert!(status.success(), "a drained worker exits 0: {status}");
    {
        let store = Store::open(&db).unwrap();
        let attempts = store.attempts("drain").unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome.as_deref(), Some("preempted"));
        let trial = &store.trials("drain").unwrap()[0];
        assert_eq!(trial.state, "pending");
        assert!(store.checkpoint(&trial.id).unwrap().is_some());
    }

    let mut second = Proc::spawn(worker(port, &["--name", "second"]));
    assert!(coord.wait(Duration::from_secs(600)).success());
    assert!(second.wait(Duration::from_secs(60)).success());
    let store = Store::open(&db).unwrap();
    let trial = &store.trials("drain").unwrap()[0];
    assert_eq!(trial.state, "succeeded");
    let outcomes: Vec<_> = store
        .attempts("drain")
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["preempted", "succeeded"]);

    // The same trial, uninterrupted, through `worker run`.
    let out = Command::new(&binaries().worker)
        .args([
            "run",
            "--task",
            "signal_game",
            "--estimator",
            "sfe",
            "--seed",
            "1",
        ])
        .args([
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--test-limit",
            "16",
            "--json",
        ])
        .arg("--data-dir")
        .arg(data_dir())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let resumed = trial.metrics.as_ref().unwrap();
    for (name, value) in summary["metrics"].as_object().unwrap() {
        assert_eq!(resumed[name], value.as_f64().unwrap(), "{name}");
    }
}

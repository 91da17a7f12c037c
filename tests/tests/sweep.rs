//! The main job end to end: the real `coordinator` and real `worker` processes on 127.0.0.1,
//! training the `ci` sweep on the real datasets, with the coordinator killed by SIGKILL
//! along the way. Workers killed mid-trial are in `faults.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use coordinator::store::Store;
use lvm_sweep_tests::harness::{Proc, coordinator, free_port, serve, worker, workspace};

const LONG: Duration = Duration::from_secs(900);

fn ci_sweep() -> String {
    workspace().join("sweeps/ci.yaml").display().to_string()
}

/// Every trial succeeded, and exactly one attempt of each was accepted as succeeded.
fn assert_each_succeeded_once(db: &Path, sweep: &str, trials: usize) -> Vec<String> {
    let store = Store::open(db).unwrap();
    let stored = store.trials(sweep).unwrap();
    assert_eq!(stored.len(), trials);
    for t in &stored {
        assert_eq!(t.state, "succeeded", "trial {}: {:?}", t.id, t.error);
        assert!(t.metrics.as_ref().is_some_and(|m| m.len() == 3), "{t:?}");
    }
    let mut successes: BTreeMap<String, usize> = BTreeMap::new();
    let mut workers = Vec::new();
    for a in store.attempts(sweep).unwrap() {
        if a.outcome.as_deref() == Some("succeeded") {
            *successes.entry(a.trial.clone()).or_default() += 1;
        }
        workers.push(a.worker);
    }
    assert_eq!(successes.len(), trials);
    assert!(successes.values().all(|&n| n == 1), "{successes:?}");
    workers
}

fn succeeded_so_far(db: &Path, sweep: &str) -> usize {
    if !db.exists() {
        return 0;
    }
    Store::open(db)
        .and_then(|s| s.trials(sweep))
        .map(|t| t.iter().filter(|t| t.state == "succeeded").count())
        .unwrap_or(0)
}

#[test]
fn the_ci_sweep_runs_on_two_workers_and_reports_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sweep.db");
    let db_arg = db.display().to_string();
    let (mut coord, port) = serve(&workspace().join("sweeps/ci.yaml"), &db, &[]);
    let mut w1 = Proc::spawn(worker(port, &["--name", "one"]));
    let mut w2 = Proc::spawn(worker(port, &["--name", "two"]));
    let status = coord.wait(LONG);
    let tables = coord.stdout();
    assert!(
        status.success(),
        "coordinator: {status}\n{}",
        coord.seen.join("\n")
    );
    assert!(tables.contains("## bitvec (D=32)"), "{tables}");
    assert!(w1.wait(Duration::from_secs(60)).success());
    assert!(w2.wait(Duration::from_secs(60)).success());

    let workers = assert_each_succeeded_once(&db, "ci", 48);
    assert!(workers.iter().any(|w| w.starts_with("one-")));
    assert!(workers.iter().any(|w| w.starts_with("two-")));

    let status = std::process::Command::new(&lvm_sweep_tests::harness::binaries().coordinator)
        .args(["status", "--db", &db_arg])
        .output()
        .unwrap();
    let status = String::from_utf8(status.stdout).unwrap();
    assert!(
        status.contains("sweep ci: 48 trials: 48 succeeded, 0 running, 0 failed, 0 pending"),
        "{status}"
    );

    // The same numbers in every format.
    let report = |format: &str| {
        let out = std::process::Command::new(&lvm_sweep_tests::harness::binaries().coordinator)
            .args(["report", "--db", &db_arg, "--format", format])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (md, latex, csv) = (report("md"), report("latex"), report("csv"));
    let json: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    assert_eq!(
        md, tables,
        "the report equals the tables printed at the end of the sweep"
    );
    let titles: Vec<&str> = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["ssvae", "signal_game", "bitvec (D=32)"]);
    let mut cells = 0;
    for table in json["tables"].as_array().unwrap() {
        let title = table["title"].as_str().unwrap();
        for row in table["rows"].as_array().unwrap() {
            let label = row["label"].as_str().unwrap();
            for (metric, cell) in row["cells"].as_object().unwrap() {
                assert_eq!(cell["n"], 2, "{title} {label} {metric}: two seeds");
                let mean = cell["mean"].as_f64().unwrap();
                let prefix = format!("{title},{label},{metric},");
                let line = csv.lines().find(|l| l.starts_with(&prefix)).unwrap();
                let shown = line[prefix.len()..].split(',').next().unwrap();
                let decimals = shown.split('.').nth(1).unwrap().len();
                assert!(
                    (shown.parse::<f64>().unwrap() - mean).abs()
                        <= 0.5 * 10f64.powi(-(decimals as i32)) + 1e-12,
                    "{line} vs {mean}"
                );
                assert!(md.contains(shown), "markdown lacks {shown} ({prefix})");
                assert!(latex.contains(shown), "LaTeX lacks {shown} ({prefix})");
                cells += 1;
            }
        }
    }
    assert_eq!(cells, 48 / 2 * 3, "a cell per (estimator, metric)");
}

#[test]
fn a_coordinator_killed_mid_sweep_resumes_and_no_trial_succeeds_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sweep.db");
    let db_arg = db.display().to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--sweep", &ci_sweep(), "--db", &db_arg, "--listen", &listen];
    let mut first = Proc::spawn(coordinator(&args));
    first.wait_for_line("listening on", Duration::from_secs(60));
    let mut w1 = Proc::spawn(worker(port, &["--name", "one"]));
    let mut w2 = Proc::spawn(worker(port, &["--name", "two"]));
    let deadline = Instant::now() + LONG;
    while succeeded_so_far(&db, "ci") < 8 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    first.kill();
    let before = succeeded_so_far(&db, "ci");
    assert!(before < 48, "the sweep finished before the kill");
    // The workers keep retrying while the coordinator is away.
    std::thread::sleep(Duration::from_secs(2));
    let mut second = Proc::spawn(coordinator(&args));
    let status = second.wait(LONG);
    assert!(status.success(), "{}", second.seen.join("\n"));
    assert!(
        second.seen.iter().any(|l| l.contains("48 trials (0 new)")),
        "the restart adds nothing: {:?}",
        second.seen
    );
    assert!(w1.wait(Duration::from_secs(60)).success());
    assert!(w2.wait(Duration::from_secs(60)).success());
    assert_each_succeeded_once(&db, "ci", 48);
}

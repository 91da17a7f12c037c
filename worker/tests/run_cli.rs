//! `worker run` as a user runs it: the JSON summary per task, refusals of invalid trials before
//! any training, and a trial SIGKILLed mid-run that resumes from its checkpoint to the same
//! metrics as an uninterrupted run.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    let data =
        std::env::var_os("LVM_DATA_DIR").map_or_else(|| "data".into(), std::path::PathBuf::from);
    let data = if data.is_relative() && !data.exists() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(data)
    } else {
        data
    };
    cmd.env("LVM_DATA_DIR", data);
    cmd
}

fn run(args: &[&str]) -> Output {
    worker().arg("run").args(args).output().unwrap()
}

fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn json_summary_has_each_tasks_metrics() {
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &[
                "--task",
                "ssvae",
                "--estimator",
                "sparsemax",
                "--warm-start-epochs",
                "0",
            ],
            &["test_accuracy", "test_neg_elbo", "decoder_calls"],
        ),
        (
            &["--task", "signal_game", "--estimator", "sfe"],
            &["test_success", "test_loss", "decoder_calls"],
        ),
        (
            &[
                "--task",
                "bitvec",
                "--estimator",
                "topk_sparsemax",
                "--importance-samples",
                "16",
            ],
            &["test_nll_bits_per_dim", "test_neg_elbo", "decoder_calls"],
        ),
    ];
    for (args, metrics) in cases {
        let common = [
            "--seed",
            "3",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--test-limit",
            "16",
        ];
        let output = run(&[args, &common[..], &["--json"]].concat());
        let json = summary(&output);
        assert_eq!(json["task"], args[1]);
        assert_eq!(json["estimator"], args[3]);
        assert_eq!(json["seed"], 3);
        let got = json["metrics"].as_object().unwrap();
        assert_eq!(got.len(), metrics.len(), "{json}");
        for m in metrics {
            assert!(got[*m].as_f64().unwrap().is_finite(), "{m} in {json}");
        }
        assert!(json["wall_seconds"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn invalid_trials_are_refused_with_what_is_valid() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--task", "ssvae", "--estimator", "sparsemap"],
            "valid: sfe, sfe_plus",
        ),
        (
            &[
                "--task",
                "bitvec",
                "--estimator",
                "sparsemap_budget",
                "--budget",
                "33",
            ],
            "budget = 33",
        ),
        (
            &[
                "--task",
                "bitvec",
                "--estimator",
                "topk_sparsemax",
                "--k",
                "0",
            ],
            "k = 0",
        ),
        (
            &["--task", "mnist", "--estimator", "sfe"],
            "valid: ssvae, signal_game, bitvec",
        ),
    ];
    for (args, message) in cases {
        let started = Instant::now();
        let output = run(&[args, &["--seed", "1"][..]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "nothing trained");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn a_killed_trial_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("ckpt");
    let args = [
        "--task",
        "signal_game",
        "--estimator",
        "sfe",
        "--seed",
        "5",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--test-limit",
        "64",
        "--json",
    ];
    let whole = summary(&run(&args));

    let resumable = [
        &args[..],
        &["--checkpoint-dir", checkpoints.to_str().unwrap()],
    ]
    .concat();
    let mut child = worker().arg("run").args(&resumable).spawn().unwrap();
    let file = checkpoints.join("checkpoint.bin");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !file.exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the trial ended before being killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let resumed = summary(&run(&resumable));
    assert_eq!(resumed["metrics"], whole["metrics"]);
}

/// A `.npy` v1.0 file: the header dict padded with spaces to a multiple of 64 bytes.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn the_game_trains_on_features_given_as_npy() {
    // 16 concepts × 3 images of 8 features each, train and test alike.
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (48, 8);
    let features: Vec<u8> = (0..n * d)
        .flat_map(|i| (1.0f32 + ((i * 7919) % 13) as f32).to_le_bytes())
        .collect();
    let labels: Vec<u8> = (0..n as i64).flat_map(|i| (i % 16).to_le_bytes()).collect();
    for split in ["train", "test"] {
        let f = npy("<f4", &format!("({n}, {d})"), &features);
        std::fs::write(dir.path().join(format!("{split}_features.npy")), f).unwrap();
        let l = npy("<i8", &format!("({n},)"), &labels);
        std::fs::write(dir.path().join(format!("{split}_labels.npy")), l).unwrap();
    }
    let path = dir.path().to_str().unwrap();
    let args = [
        "--task",
        "signal_game",
        "--estimator",
        "sparsemax",
        "--seed",
        "1",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--test-limit",
        "8",
        "--game-features",
        path,
        "--json",
    ];
    let json = summary(&run(&args));
    assert!(json["metrics"]["test_success"].as_f64().unwrap() <= 1.0);

    // A corrupt file is named in the error.
    std::fs::write(dir.path().join("test_labels.npy"), b"not numpy").unwrap();
    let output = run(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("test_labels.npy"), "{stderr}");
}

//! The `mappings` example as a user runs it: one JSON request on stdin, one answer on stdout,
//! a one-line error and a non-zero exit for a malformed request.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// `cargo test` builds examples next to the test binaries, in `target/<profile>/examples/`;
/// when only this test was asked for, the example is built here first.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let binary = profile_dir
        .join("examples")
        .join(format!("mappings{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--example", "mappings"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the mappings example failed");
    }
    binary
}

fn run(request: &str) -> (bool, String, String) {
    let mut child = Command::new(example_binary())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the mappings example is built by cargo test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

fn answer(request: &str) -> Value {
    let (ok, stdout, stderr) = run(request);
    assert!(ok, "request failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn sparsemax_with_upstream_gives_probabilities_and_the_vjp() {
    // z = [1, 0.5, -1]: p = [0.75, 0.25, 0]; g = [1, 0, 0]: ∇ = [1 - 0.5, 0 - 0.5, 0].
    let a = answer(
        r#"{"mapping":"sparsemax","scores":[[1,0.5,-1],[0,null,0]],
                      "upstream":[[1,0,0],[0,0,0]]}"#,
    );
    assert_eq!(
        a["probs"],
        serde_json::json!([[0.75, 0.25, 0.0], [0.5, 0.0, 0.5]])
    );
    assert_eq!(a["grad"][0], serde_json::json!([0.5, -0.5, 0.0]));
}

#[test]
fn topk_returns_the_reference_golden_example() {
    // Reference §6: s = [1.2, 0.7, -0.1, 0.4, -2.0], k = 4.
    let a = answer(r#"{"mapping":"topk","scores":[[1.2,0.7,-0.1,0.4,-2.0]],"k":4}"#);
    assert_eq!(a["configs"][0][0], serde_json::json!([1, 1, 0, 1, 0]));
    assert_eq!(a["configs"][0][3], serde_json::json!([1, 1, 1, 0, 0]));
    assert!((a["config_scores"][0][0].as_f64().unwrap() - 2.3).abs() < 1e-6);
}

#[test]
fn topk_sparsemax_and_sparsemap_answer_in_shape() {
    let a = answer(r#"{"mapping":"topk_sparsemax","scores":[[0.3,-0.2,0.1]],"k":3}"#);
    let probs = floats(&a["probs"][0]);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    let a = answer(
        r#"{"mapping":"sparsemap","scores":[[0.5,-3.0,0.2]],"budget":0,
                      "max_iter":300,"init":"random"}"#,
    );
    // Marginals clip((s + 1) / 2, 0, 1) = [0.75, 0, 0.6].
    let mu = floats(&a["marginals"][0]);
    for (m, e) in mu.iter().zip([0.75, 0.0, 0.6]) {
        assert!((m - e).abs() < 1e-7, "{m} vs {e} (f32 inputs)");
    }
}

#[test]
fn malformed_requests_get_one_line_errors() {
    for (request, needle) in [
        ("not json", "invalid request"),
        (
            r#"{"mapping":"sparsemaxx","scores":[[1]]}"#,
            "unknown variant",
        ),
        (r#"{"mapping":"topk","scores":[[1,2]],"k":5}"#, "k = 5"),
        (
            r#"{"mapping":"sparsemax","scores":[[1,2],[3]]}"#,
            "row 1 has 1 entries",
        ),
        (
            r#"{"mapping":"sparsemax","scores":[[null,null]]}"#,
            "every score is -inf",
        ),
        (
            r#"{"mapping":"sparsemap","scores":[[1]],"max_iter":0}"#,
            "max_iter",
        ),
        (
            r#"{"mapping":"topk","scores":[[1]],"k":1,"extra":1}"#,
            "unknown field",
        ),
    ] {
        let (ok, stdout, stderr) = run(request);
        assert!(!ok, "{request} should fail");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{request}: {stderr}");
    }
}

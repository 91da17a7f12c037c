//! End-to-end tests that start the real `coordinator` and `worker` binaries on 127.0.0.1
//! (`tests/`, with what they share in [`harness`]), and the workspace-wide source checks
//! that `cargo fmt` does not make: no line of a Rust file over 100 characters (comments
//! included), generated code aside.

pub mod harness;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    /// The house width limit (`rustfmt.toml`), in characters, not bytes.
    const MAX_WIDTH: usize = 100;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir)
            .expect("readable workspace directory")
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "generated" {
                    rust_files(&path, out);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_rust_line_exceeds_100_characters() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let mut files = Vec::new();
        rust_files(root, &mut files);
        assert!(
            files.len() > 5,
            "found only {} Rust files under {root:?}",
            files.len()
        );
        let mut wide = Vec::new();
        for file in files {
            let text = fs::read_to_string(&file).expect("UTF-8 source");
            for (n, line) in text.lines().enumerate() {
                if line.chars().count() > MAX_WIDTH {
                    wide.push(format!("{}:{}", file.display(), n + 1));
                }
            }
        }
        assert!(
            wide.is_empty(),
            "lines over {MAX_WIDTH} characters:\n{}",
            wide.join("\n")
        );
    }
}

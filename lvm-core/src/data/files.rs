//! The dataset files lvm-sweep trains on, each pinned by the SHA-256 of its decompressed bytes,
//! and the data directory that holds them: resolved from `--data-dir`, `LVM_DATA_DIR` or
//! `./data`; a missing file is downloaded from its public mirror, verified, and only then
//! written (atomically) into place.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};

use super::error::DataError;

/// One dataset file: where it lives under the data directory, its pinned hash, its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFile {
    /// Path relative to the data directory; a `.gz` suffix means gzip-compressed.
    pub path: &'static str,
    /// SHA-256 of the decompressed bytes, lower-case hex.
    pub sha256: &'static str,
    /// Public URL of the file as stored (compressed if `path` ends in `.gz`).
    pub url: &'static str,
}

/// The public mirrors: torchvision's for MNIST, Zalando's for Fashion-MNIST, and the original
/// repository at its pinned commit for the split files.
macro_rules! mirror {
    (mnist) => {
        "https://ossci-datasets.s3.amazonaws.com/mnist/"
    };
    (fashion) => {
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    };
    (splits) => {
        "https://raw.githubusercontent.com/deep-spin/sparse-marginalization-lvm/\
         9d27ec0fd58ea2eb58d79bca23a0051f1b143ebe/data/semi_supervised-vae/test_train_splits/"
    };
}

macro_rules! data_file {
    ($name:ident, $doc:literal, $path:literal, $sha:literal, $base:ident, $file:literal) => {
        #[doc = $doc]
        pub const $name: DataFile = DataFile {
            path: $path,
            sha256: $sha,
            url: concat!(mirror!($base), $file),
        };
    };
}

/// The MNIST and Fashion-MNIST IDX files and the semi-supervised split files. The IDX hashes
/// are the canonical ones of the decompressed files (they match the original releases' MD5s);
/// the split hashes are those of the files at the pinned commit (reference §7.1).
pub mod known {
    use super::*;

    data_file!(
        MNIST_TRAIN_IMAGES,
        "MNIST training images, 60000×28×28.",
        "mnist/train-images-idx3-ubyte.gz",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        mnist,
        "train-images-idx3-ubyte.gz"
    );
    data_file!(
        MNIST_TRAIN_LABELS,
        "MNIST training labels, 60000.",
        "mnist/train-labels-idx1-ubyte.gz",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        mnist,
        "train-labels-idx1-ubyte.gz"
    );
    data_file!(
        MNIST_TEST_IMAGES,
        "MNIST test images, 10000×28×28.",
        "mnist/t10k-images-idx3-ubyte.gz",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        mnist,
        "t10k-images-idx3-ubyte.gz"
    );
    data_file!(
        MNIST_TEST_LABELS,
        "MNIST test labels, 10000.",
        "mnist/t10k-labels-idx1-ubyte.gz",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        mnist,
        "t10k-labels-idx1-ubyte.gz"
    );
    data_file!(
        FASHION_TRAIN_IMAGES,
        "Fashion-MNIST training images, 60000×28×28.",
        "fashion-mnist/train-images-idx3-ubyte.gz",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        fashion,
        "train-images-idx3-ubyte.gz"
    );
    data_file!(
        FASHION_TRAIN_LABELS,
        "Fashion-MNIST training labels, 60000.",
        "fashion-mnist/train-labels-idx1-ubyte.gz",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        fashion,
        "train-labels-idx1-ubyte.gz"
    );
    data_file!(
        FASHION_TEST_IMAGES,
        "Fashion-MNIST test images, 10000×28×28.",
        "fashion-mnist/t10k-images-idx3-ubyte.gz",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        fashion,
        "t10k-images-idx3-ubyte.gz"
    );
    data_file!(
        FASHION_TEST_LABELS,
        "Fashion-MNIST test labels, 10000.",
        "fashion-mnist/t10k-labels-idx1-ubyte.gz",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        fashion,
        "t10k-labels-idx1-ubyte.gz"
    );
    data_file!(
        SSVAE_LABELED,
        "Indices of the 5000 labelled SSVAE training images.",
        "mnist/ssvae-splits/labeled_train_indx.npy",
        "b223e21a0c6602df165494116112086fc430a6db9dc5567166060283f08c070a",
        splits,
        "labeled_train_indx.npy"
    );
    data_file!(
        SSVAE_UNLABELED,
        "Indices of the 45000 unlabelled SSVAE training images.",
        "mnist/ssvae-splits/unlabeled_train_indx.npy",
        "b3acf09c73ccb1006006aeb109692c132f38e72d9afd0c4d8566f96d3aa741c7",
        splits,
        "unlabeled_train_indx.npy"
    );
    data_file!(
        SSVAE_VALIDATION,
        "Indices of the 10000 SSVAE validation images.",
        "mnist/ssvae-splits/validation_indx.npy",
        "9b67a1579d2fa1da2f9f10331383fe40baae2cd6cea8bc9fe25dd0987cbc7ac0",
        splits,
        "validation_indx.npy"
    );

    /// Every known file.
    pub const ALL: [DataFile; 11] = [
        MNIST_TRAIN_IMAGES,
        MNIST_TRAIN_LABELS,
        MNIST_TEST_IMAGES,
        MNIST_TEST_LABELS,
        FASHION_TRAIN_IMAGES,
        FASHION_TRAIN_LABELS,
        FASHION_TEST_IMAGES,
        FASHION_TEST_LABELS,
        SSVAE_LABELED,
        SSVAE_UNLABELED,
        SSVAE_VALIDATION,
    ];
}

/// The largest download accepted: the biggest dataset file is about 26 MiB compressed.
const DOWNLOAD_LIMIT: u64 = 64 << 20;
/// Largest decompressed file accepted: 47 MB for the MNIST training images.
const DECOMPRESSED_LIMIT: u64 = 128 << 20;

/// Where missing files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Never download: a missing file is an error that says where to put it.
    Offline,
    /// Each file's public URL.
    PublicMirrors,
    /// `{base}/{path}` for every file (a local mirror; used by tests on 127.0.0.1).
    Mirror(String),
}

/// The directory holding the dataset files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
    source: Source,
}

impl DataDir {
    /// A data directory at `root` fetching missing files from `source`.
    pub fn new(root: impl Into<PathBuf>, source: Source) -> Self {
        Self {
            root: root.into(),
            source,
        }
    }

    /// `explicit` (the `--data-dir` flag), else `LVM_DATA_DIR`, else `./data`, downloading
    /// from the public mirrors.
    pub fn resolve(explicit: Option<PathBuf>) -> Self {
        let root = explicit
            .or_else(|| std::env::var_os("LVM_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("data"));
        Self::new(root, Source::PublicMirrors)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The verified, decompressed bytes of `file`, downloading it first if it is missing.
    pub fn read(&self, file: &DataFile) -> Result<Vec<u8>, DataError> {
        let path = self.root.join(file.path);
        if !path.exists() {
            self.fetch(file, &path)?;
        }
        let stored = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        verified(file, &stored, &path)
    }

    /// Downloads `file`, verifies it, and only then moves it into place.
    fn fetch(&self, file: &DataFile, path: &Path) -> Result<(), DataError> {
        let url = match &self.source {
            Source::Offline => {
                let reason = "downloads are disabled".to_string();
                return Err(DataError::Missing {
                    file: path.into(),
                    url: file.url.into(),
                    reason,
                });
            }
            Source::PublicMirrors => file.url.to_string(),
            Source::Mirror(base) => format!("{}/{}", base.trim_end_matches('/'), file.path),
        };
        let missing = |reason: String| DataError::Missing {
            file: path.into(),
            url: url.clone(),
            reason,
        };
        let bytes = download(&url).map_err(missing)?;
        verified(file, &bytes, Path::new(&url))?;

        // Write beside the target, flush to disk, then rename: neither a crash nor a power
        // loss leaves a partial file at `path`, and a failed write leaves nothing behind.
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let partial = path.with_extension(format!(
            "partial-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = std::fs::File::create(&partial)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&partial, path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            DataError::io(path, e)
        })
    }
}

/// Decompresses (for `.gz` paths) and checks the pinned hash; `origin` names the bytes in
/// errors (a file or a URL).
fn verified(file: &DataFile, stored: &[u8], origin: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = if file.path.ends_with(".gz") {
        let mut out = Vec::new();
        GzDecoder::new(stored)
            .take(DECOMPRESSED_LIMIT)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                file: origin.into(),
                format: "gzip",
                detail: e.to_string(),
            })?;
        out
    } else {
        stored.to_vec()
    };
    let got = hex(&Sha256::digest(&bytes));
    if got != file.sha256 {
        return Err(DataError::Checksum {
            file: origin.into(),
            expected: file.sha256.into(),
            got,
        });
    }
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// GETs `url` into memory, refusing more than [`DOWNLOAD_LIMIT`] bytes.
fn download(url: &str) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .timeout_connect(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(DOWNLOAD_LIMIT)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    use super::known::*;
    use super::*;

    fn shared() -> DataDir {
        crate::data::test_data_dir()
    }

    /// A minimal HTTP/1.1 server on 127.0.0.1 serving `files` by path, 404 otherwise.
    fn serve(files: HashMap<String, Vec<u8>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let mut stream = stream;
                match files.get(path) {
                    Some(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(body);
                    }
                    None => {
                        let _ = stream.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\
                              Connection: close\r\n\r\n",
                        );
                    }
                }
            }
        });
        base
    }

    fn stored(file: &DataFile) -> Vec<u8> {
        let path = shared().root().join(file.path);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set LVM_DATA_DIR)", path.display()))
    }

    #[test]
    fn every_known_file_in_the_shared_data_matches_its_pinned_hash() {
        for file in ALL {
            let bytes = shared().read(&file).unwrap();
            assert!(!bytes.is_empty(), "{}", file.path);
        }
    }

    #[test]
    fn a_missing_file_is_downloaded_verified_and_written() {
        let files = HashMap::from([
            (SSVAE_LABELED.path.to_string(), stored(&SSVAE_LABELED)),
            (
                MNIST_TEST_LABELS.path.to_string(),
                stored(&MNIST_TEST_LABELS),
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path(), Source::Mirror(serve(files)));
        for file in [SSVAE_LABELED, MNIST_TEST_LABELS] {
            let bytes = data.read(&file).unwrap();
            assert_eq!(bytes, shared().read(&file).unwrap());
            assert!(dir.path().join(file.path).exists());
        }
    }

    #[test]
    fn a_download_with_the_wrong_checksum_is_refused_and_nothing_is_written() {
        let mut corrupt = stored(&SSVAE_VALIDATION);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let files = HashMap::from([(SSVAE_VALIDATION.path.to_string(), corrupt)]);
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path(), Source::Mirror(serve(files)));
        let err = data.read(&SSVAE_VALIDATION).unwrap_err();
        assert!(matches!(err, DataError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains(SSVAE_VALIDATION.sha256));
        let written: Vec<_> = walk(dir.path());
        assert!(written.is_empty(), "left behind: {written:?}");
    }

    #[test]
    fn offline_or_unreachable_names_the_file_and_where_to_put_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = DataDir::new(dir.path(), Source::Offline)
            .read(&FASHION_TEST_LABELS)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("fashion-mnist/t10k-labels-idx1-ubyte.gz"),
            "{text}"
        );
        assert!(
            text.contains(FASHION_TEST_LABELS.url) && text.contains("disabled"),
            "{text}"
        );
        let data = DataDir::new(dir.path(), Source::Mirror(serve(HashMap::new())));
        let text = data.read(&FASHION_TEST_LABELS).unwrap_err().to_string();
        assert!(text.contains("404"), "{text}");
    }

    #[test]
    fn a_corrupted_stored_file_is_an_error_naming_it_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MNIST_TEST_LABELS.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not gzip at all").unwrap();
        let err = DataDir::new(dir.path(), Source::Offline)
            .read(&MNIST_TEST_LABELS)
            .unwrap_err();
        assert!(
            err.to_string().contains("t10k-labels-idx1-ubyte.gz"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"not gzip at all");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() {
                out.extend(walk(&entry.path()));
            } else {
                out.push(entry.path());
            }
        }
        out
    }
}

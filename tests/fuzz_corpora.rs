//! The committed fuzz corpora (`tests/fuzz/corpus`, grown by `scripts/fuzz` on nightly)
//! replayed on stable: every input through both parsers, exactly as the fuzz targets feed
//! them, so CI keeps every case the fuzzer found interesting.

use std::path::{Path, PathBuf};

use lifeboat::{api::validate, backend::Endpoint};

/// Every file under `tests/fuzz/{corpus,artifacts}/TARGET` (artifacts are crashes found
/// and fixed: regression cases).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut found = Vec::new();
    for dir in [
        root.join("corpus").join(target),
        root.join("artifacts").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                found.push((path, bytes));
            }
        }
    }
    found
}

#[test]
fn every_corpus_input_passes_both_parsers_without_a_panic() {
    let requests = inputs("parse_request");
    let streams = inputs("sse_parser");
    assert!(
        !requests.is_empty() && !streams.is_empty(),
        "the corpora are committed under tests/fuzz/corpus"
    );
    // Each corpus through both parsers: a request body is also odd SSE, and vice versa.
    for (path, data) in requests.iter().chain(&streams) {
        let outcome = std::panic::catch_unwind(|| {
            let _ = validate::parse(Endpoint::ChatCompletions, data);
            let _ = validate::parse(Endpoint::Completions, data);
            lifeboat::upstream::sse::fuzz_input(data);
        });
        assert!(outcome.is_ok(), "{} panicked", path.display());
    }
}

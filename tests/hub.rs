//! Models from the Hugging Face Hub through the real hf-hub client, against a small mock Hub
//! on 127.0.0.1:0 (`HF_ENDPOINT`): `model pull` into the cache, `serve --model owner/repo:QUANT`
//! working offline from that cache, and the message when neither Hub nor cache has it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use lifeboat::engine::{
    Arch,
    testing::{tiny::make_tiny, tiny_gguf::make_tiny_gguf},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Repo id → file name → bytes.
type Repos = Arc<HashMap<String, HashMap<String, Vec<u8>>>>;

async fn info(
    State(repos): State<Repos>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    match repos.get(&format!("{owner}/{name}")) {
        Some(files) => {
            let siblings: Vec<Value> = files.keys().map(|f| json!({"rfilename": f})).collect();
            Json(json!({"siblings": siblings, "sha": COMMIT})).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `resolve/{rev}/{file}` with the headers hf-hub reads and `Range: bytes=N-` support.
async fn resolve(
    State(repos): State<Repos>,
    UrlPath((owner, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(bytes) = repos.get(&format!("{owner}/{name}")).and_then(|r| r.get(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'));
    let (start, end) = match range {
        Some((start, end)) => (
            start.parse().unwrap_or(0),
            end.parse::<usize>()
                .map_or(bytes.len(), |e| (e + 1).min(bytes.len())),
        ),
        None => (0, bytes.len()),
    };
    let body = bytes[start.min(bytes.len())..end].to_vec();
    (
        StatusCode::PARTIAL_CONTENT,
        [
            ("x-repo-commit", COMMIT.to_string()),
            ("etag", format!("\"{digest}\"")),
            (
                "content-range",
                format!("bytes {start}-{}/{}", end.saturating_sub(1), bytes.len()),
            ),
        ],
        body,
    )
        .into_response()
}

async fn spawn_hub(repos: Repos) -> String {
    let app = Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(repos);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn files_of(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

fn lifeboat(hf_home: &Path, endpoint: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
    command
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    command
}

fn pull(hf_home: &Path, endpoint: &str, repo: &str) -> Result<PathBuf, String> {
    let output = lifeboat(hf_home, endpoint)
        .args(["model", "pull", repo])
        .output()
        .expect("runs");
    if output.status.success() {
        Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_caches_and_works_offline_from_the_cache() {
    let source = tempfile::tempdir().expect("temp dir");
    make_tiny_gguf(Arch::Qwen2, &source.path().join("gguf/tiny-F32.gguf"), 7).expect("gguf");
    make_tiny(Arch::Llama, &source.path().join("folder"), 7).expect("folder");
    let mut gguf_repo = files_of(&source.path().join("gguf"));
    gguf_repo.insert("README.md".into(), b"tiny".to_vec());
    let repos: Repos = Arc::new(HashMap::from([
        ("lifeboat/tiny-GGUF".to_string(), gguf_repo),
        (
            "lifeboat/tiny-llama".to_string(),
            files_of(&source.path().join("folder")),
        ),
    ]));
    let hub = spawn_hub(repos).await;
    let hf_home = tempfile::tempdir().expect("HF_HOME");
    let unreachable = "http://127.0.0.1:1";

    let (home, hub_url) = (hf_home.path().to_path_buf(), hub.clone());
    let (gguf, folder) = tokio::task::spawn_blocking(move || {
        (
            pull(&home, &hub_url, "lifeboat/tiny-GGUF:f32"),
            pull(&home, &hub_url, "lifeboat/tiny-llama"),
        )
    })
    .await
    .expect("join");
    let gguf = gguf.expect("GGUF pulled");
    assert!(
        gguf.starts_with(hf_home.path()) && gguf.ends_with("tiny-F32.gguf"),
        "{}",
        gguf.display()
    );
    let folder = folder.expect("folder pulled");
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(folder.join(file).exists(), "{file} in {}", folder.display());
    }

    // The Hub is gone: the cache answers, for a quant tag too.
    let home = hf_home.path().to_path_buf();
    let again = tokio::task::spawn_blocking(move || pull(&home, unreachable, "lifeboat/tiny-GGUF:F32"))
        .await
        .expect("join");
    assert_eq!(again.expect("from the cache"), gguf);

    // Neither Hub nor cache: the message says what to do instead.
    let home = hf_home.path().to_path_buf();
    let err = tokio::task::spawn_blocking(move || pull(&home, unreachable, "lifeboat/absent-GGUF:Q4_K_M"))
        .await
        .expect("join")
        .expect_err("nothing to serve");
    assert!(
        err.contains("lifeboat/absent-GGUF") && err.contains("--model"),
        "{err}"
    );
    assert!(err.contains("scripts/fetch-test-models"), "{err}");

    // HF_HUB_CACHE puts the cache elsewhere, as the Python tools do; HF_HUB_OFFLINE keeps
    // lifeboat off the network even when the Hub answers.
    let cache = tempfile::tempdir().expect("HF_HUB_CACHE");
    let (home, cache_dir, hub_url) = (
        hf_home.path().to_path_buf(),
        cache.path().to_path_buf(),
        hub.clone(),
    );
    let (moved, offline) = tokio::task::spawn_blocking(move || {
        let output = lifeboat(&home, &hub_url)
            .env("HF_HUB_CACHE", &cache_dir)
            .args(["model", "pull", "lifeboat/tiny-GGUF:F32"])
            .output()
            .expect("runs");
        let offline = lifeboat(&home, &hub_url)
            .env("HF_HUB_CACHE", cache_dir.join("empty"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["model", "pull", "lifeboat/tiny-GGUF:F32"])
            .output()
            .expect("runs");
        (output, offline)
    })
    .await
    .expect("join");
    let moved = String::from_utf8_lossy(&moved.stdout).trim().to_string();
    assert!(moved.starts_with(&cache.path().display().to_string()), "{moved}");
    assert!(!offline.status.success());
    let err = String::from_utf8_lossy(&offline.stderr);
    assert!(
        err.contains("lifeboat/tiny-GGUF") && err.contains("--model"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_takes_a_repo_id_and_reports_a_failed_fetch_on_ready() {
    let source = tempfile::tempdir().expect("temp dir");
    make_tiny_gguf(Arch::Qwen3, &source.path().join("tiny-Q4_K_M.gguf"), 7).expect("gguf");
    let repos: Repos = Arc::new(HashMap::from([(
        "lifeboat/tiny-GGUF".to_string(),
        files_of(source.path()),
    )]));
    let hub = spawn_hub(repos).await;
    let hf_home = tempfile::tempdir().expect("HF_HOME");

    // `serve` with no --model at all reaches for the default DeepSeek model; offline, /ready
    // says why and what to pass instead, and the server keeps answering.
    for (model, expect_ready) in [(None, false), (Some("lifeboat/tiny-GGUF:Q4_K_M"), true)] {
        let mut command = lifeboat(
            hf_home.path(),
            if expect_ready { &hub } else { "http://127.0.0.1:1" },
        );
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(model) = model {
            command.args(["--model", model]);
        }
        let mut child = KillOnDrop(
            command
                .env_remove("LIFEBOAT_MODEL")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        let stderr = child.0.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let base = loop {
            let line = rx.recv_timeout(Duration::from_secs(20)).expect("a log line");
            if let Some(rest) = line.split("OpenAI base URL ").nth(1) {
                break rest.split_whitespace().next().unwrap_or(rest).to_string();
            }
        };
        lifeboat::upstream::install_crypto_provider();
        let client = reqwest::Client::new();
        let mut ready = Value::Null;
        for _ in 0..200 {
            ready = client
                .get(format!("{}/ready", base.trim_end_matches("/v1")))
                .send()
                .await
                .expect("ready")
                .json()
                .await
                .expect("json");
            let phase = ready["phases"]["local"].as_str().unwrap_or_default();
            if phase == "ready" || phase.starts_with("failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let phase = ready["phases"]["local"].as_str().unwrap_or_default().to_string();
        if expect_ready {
            assert_eq!(phase, "ready", "{ready}");
            let models: Value = client
                .get(format!("{base}/models"))
                .send()
                .await
                .expect("models")
                .json()
                .await
                .expect("json");
            assert_eq!(models["data"][0]["id"], "tiny", "{models}");
        } else {
            assert!(
                phase.contains("unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF"),
                "{phase}"
            );
            assert!(
                phase.contains("--model") && phase.contains("scripts/fetch-test-models"),
                "{phase}"
            );
            let health = client
                .get(format!("{}/health", base.trim_end_matches("/v1")))
                .send()
                .await
                .expect("health");
            assert_eq!(health.status(), 200);
        }
        drop(child);
    }
}

/// A spawned server that is killed however the test ends, so a failed assertion never
/// leaves it holding the test's output pipes open.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

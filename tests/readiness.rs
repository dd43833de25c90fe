//! `/ready` matches the job: a local model that failed to load degrades a box whose
//! gateway serves (200, the failure listed) instead of taking it out of service; with
//! nothing left that serves it is 503; and a readiness probe's answers, 503 included,
//! do not write an ERROR or WARN line each.

use crate::{
    cli::{Running, between, lifeboat, write_config},
    common::{TestApp, chat_body, spawn_app_with},
};

use std::{collections::HashMap, path::PathBuf, time::Duration};

use lifeboat::mock_upstream::MockSettings;
use serde_json::Value;

/// A file the engine accepts as a source but cannot load: not a GGUF inside.
fn broken_model(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"this is not a GGUF file at all").expect("write");
    path
}

/// `/ready` once the local model's load has ended (in failure, here).
async fn ready_after_load(app: &TestApp) -> (u16, Value) {
    for _ in 0..500 {
        let response = app.get("/ready").await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("json");
        if body["phases"]["local"].as_str().is_some_and(|p| p != "loading") {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the local model is still loading");
}

#[tokio::test]
async fn a_failed_local_model_degrades_a_box_whose_gateway_serves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = broken_model(&dir);
    let app = spawn_app_with(
        MockSettings::default(),
        move |config| {
            config.local.model = Some(model);
            config.local.served_model_name = Some("tiny".into());
        },
        HashMap::new(),
    )
    .await;
    let (status, body) = ready_after_load(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    let degraded: Vec<&str> = body["degraded"]
        .as_array()
        .expect("degraded")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(degraded.iter().any(|d| d.starts_with("local: failed:")), "{body}");
    assert_eq!(body["unserved_routes"], serde_json::json!(["tiny"]), "{body}");
    // Still what it says: the gateway answers.
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
}

#[tokio::test]
async fn a_failed_local_model_alone_is_not_ready() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = broken_model(&dir);
    let app = spawn_app_with(
        MockSettings::default(),
        move |config| {
            config.remotes.clear();
            config.local.model = Some(model);
            config.local.served_model_name = Some("tiny".into());
        },
        HashMap::new(),
    )
    .await;
    let (status, body) = ready_after_load(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(body["unserved_routes"], serde_json::json!(["tiny"]), "{body}");
}

/// `lifeboat serve` with `config` (logging at its default level, info) until it listens;
/// returns it and its base URL without `/v1`.
fn serve(config: &tempfile::NamedTempFile, model: &std::path::Path) -> (Running, String) {
    let mut command = lifeboat();
    command.args([
        "serve",
        "--config",
        &config.path().display().to_string(),
        "--model",
        &model.display().to_string(),
    ]);
    let mut server = Running::spawn(command);
    let line = server.wait_for("OpenAI base URL");
    let base = between(&line, "OpenAI base URL ", ' ').trim().to_string();
    (server, base.trim_end_matches("/v1").to_string())
}

#[test]
fn readiness_probes_do_not_log_a_line_each() {
    const PROBES: usize = 10;
    let dir = tempfile::tempdir().expect("temp dir");
    let model = broken_model(&dir);
    // A gateway that is never called (the probe is off): configured is usable.
    let with_gateway = write_config(
        "[server]\nlisten = \"127.0.0.1:0\"\n[router]\nprobe_interval = \"0s\"\n[remotes.gateway]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"deepseek-chat\"]\n",
    );
    let alone = write_config("[server]\nlisten = \"127.0.0.1:0\"\n");
    lifeboat::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (config, expected) in [(&with_gateway, 200), (&alone, 503)] {
        let (mut server, base) = serve(config, &model);
        let statuses: Vec<u16> = runtime.block_on(async {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            while statuses.len() < PROBES {
                let response = client.get(format!("{base}/ready")).send().await.expect("ready");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("json");
                // Count only the answers after the load has failed.
                if body["phases"]["local"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("failed"))
                {
                    statuses.push(status);
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            statuses
        });
        assert_eq!(server.terminate(), 0);
        assert_eq!(statuses, vec![expected; PROBES]);
        let log = server.log.join("\n");
        let loud: Vec<&String> = server
            .log
            .iter()
            .filter(|line| line.contains(" ERROR ") || line.contains(" WARN "))
            .collect();
        // The failed load is worth a line; each probe is not.
        assert!(loud.len() < PROBES, "{expected}: a loud line per probe:\n{log}");
        assert!(
            !loud
                .iter()
                .any(|l| l.contains("response failed") || l.contains("/ready")),
            "{expected}: a probe answer was logged as a failure:\n{log}"
        );
    }
}

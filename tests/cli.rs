//! The `lifeboat` binary: config errors name the file and key, flags beat environment
//! beats file, secrets never reach the logs, SIGTERM drains and exits 0, and the
//! `mock-upstream` command with its admin port.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

pub(crate) fn lifeboat() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
    for (key, _) in std::env::vars() {
        if key.starts_with("LIFEBOAT_") {
            command.env_remove(key);
        }
    }
    command
}

pub(crate) fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write");
    file
}

/// Run `serve` expecting it to refuse to start; returns (exit code, stderr).
fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = lifeboat()
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    assert!(!output.status.success(), "should fail: {args:?}");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn config_errors_name_file_line_and_key() {
    let file = write_config("[server]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n");
    let path = file.path().display().to_string();
    let (code, stderr) = serve_fails(&["--config", &path], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&path) && stderr.contains("line 3") && stderr.contains("unknown field `lisen`"),
        "{stderr}"
    );

    let file =
        write_config("[remotes.deepseek]\nbase_url = \"https://api.deepseek.com/v1\"\ntotal_timeout = 30\n");
    let (code, stderr) = serve_fails(&["--config", &file.path().display().to_string()], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("remotes.deepseek.total_timeout"), "{stderr}");

    let file = write_config(
        "[remotes.deepseek]\nbase_url = \"https://api.deepseek.com/v1\"\napi_key_env = \"LIFEBOAT_TEST_UNSET_KEY\"\n",
    );
    let (code, stderr) = serve_fails(&["--config", &file.path().display().to_string()], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(
            "remotes.deepseek.api_key_env: environment variable LIFEBOAT_TEST_UNSET_KEY is not set"
        ),
        "{stderr}"
    );

    let (code, stderr) = serve_fails(&["--config", "/nonexistent/lifeboat.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read config file /nonexistent/lifeboat.toml"),
        "{stderr}"
    );

    let (code, stderr) = serve_fails(&["--remote-url", "ftp://example.com/v1"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("remotes.gateway.base_url"), "{stderr}");

    let (code, stderr) = serve_fails(&[], &[("LIFEBOAT_LISTEN", "not-an-address")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--listen"), "clap names the setting: {stderr}");
}

#[test]
fn example_config_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lifeboat.example.toml");
    // Parses and validates; stops only at the missing key, which it names.
    let (code, stderr) = serve_fails(&["--config", example], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("DEEPSEEK_API_KEY is not set"), "{stderr}");
}

pub(crate) struct Running {
    pub(crate) child: Child,
    lines: mpsc::Receiver<String>,
    pub(crate) log: Vec<String>,
}

impl Running {
    pub(crate) fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, lines) = mpsc::channel();
        for reader in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Running {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Wait for a line containing `needle`; returns it.
    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; output so far:\n{}", self.log.join("\n")),
            }
        }
    }

    pub(crate) fn terminate(&mut self) -> i32 {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(status.success());
        let status = self.child.wait().expect("wait");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        status.code().unwrap_or(-1)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn between<'a>(line: &'a str, start: &str, end: char) -> &'a str {
    let rest = &line[line.find(start).unwrap_or_else(|| panic!("{start} in {line}")) + start.len()..];
    rest.split(end).next().unwrap_or(rest)
}

/// `lifeboat mock-upstream` on port 0 (API and admin) with `extra` arguments; returns
/// the process, its API base URL and its admin URL.
fn spawn_mock(extra: &[&str], env: &[(&str, &str)]) -> (Running, String, String) {
    let mut command = lifeboat();
    command
        .args([
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .envs(env.iter().copied());
    let mut mock = Running::spawn(command);
    let line = mock.wait_for("mock-upstream api=");
    let api = between(&line, "api=", ' ').to_string();
    let admin = between(&line, "admin=", ' ').to_string();
    (mock, api, admin)
}

#[test]
fn serve_with_flags_env_and_file_then_sigterm() {
    // The mock gateway, through its own CLI, on port 0.
    let (mut mock, api, admin) = spawn_mock(
        &[
            "--models",
            "deepseek-chat,deepseek-reasoner",
            "--api-key-env",
            "MOCK_KEY",
        ],
        &[("MOCK_KEY", "sk-super-secret-value")],
    );

    // File says one thing, environment another, flags a third: flags win, then env.
    let file = write_config(
        "[server]\nlisten = \"127.0.0.1:1\"\n[remotes.gateway]\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels = [\"from-file\"]\n",
    );
    let mut command = lifeboat();
    command
        .args([
            "serve",
            "--config",
            &file.path().display().to_string(),
            "--remote-model",
            "deepseek-reasoner",
        ])
        .env("LIFEBOAT_LISTEN", "127.0.0.1:0")
        .env("LIFEBOAT_MODEL", "none")
        .env("LIFEBOAT_REMOTE_URL", &api)
        .env("LIFEBOAT_REMOTE_MODEL", "deepseek-chat")
        .env("LIFEBOAT_REMOTE_API_KEY_ENV", "GATEWAY_KEY")
        .env("GATEWAY_KEY", "sk-super-secret-value")
        .env("LIFEBOAT_LOG", "trace");
    let mut server = Running::spawn(command);
    let line = server.wait_for("OpenAI base URL");
    let base = between(&line, "OpenAI base URL ", ' ').trim().to_string();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    lifeboat::upstream::install_crypto_provider();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let models: Value = client.get(format!("{base}/models")).send().await.expect("models").json().await.expect("json");
        assert_eq!(models["data"][0]["id"], "deepseek-reasoner", "flag beats env beats file: {models}");
        let chat = serde_json::json!({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}]});
        let response = client.post(format!("{base}/chat/completions")).json(&chat).send().await.expect("chat");
        assert_eq!(response.status(), 200, "the key from GATEWAY_KEY reached the mock");

        let fault = serde_json::json!({"mode": "http503"});
        let switched = client.post(format!("{admin}/fault")).json(&fault).send().await.expect("admin");
        assert_eq!(switched.status(), 200);
        let response = client.post(format!("{base}/chat/completions")).json(&chat).send().await.expect("chat");
        assert_eq!(response.status(), 502);
        let stats: Value = client.get(format!("{admin}/stats")).send().await.expect("stats").json().await.expect("json");
        assert_eq!(stats["by_mode"]["http503"], 2, "the request and lifeboat's one retry: {stats}");
        assert_eq!(stats["mode"], "http503");
    });

    assert_eq!(server.terminate(), 0, "SIGTERM is a clean exit");
    let log = server.log.join("\n");
    assert!(log.contains("received SIGTERM"), "{log}");
    assert!(
        !log.contains("sk-super-secret-value"),
        "the gateway key leaked into the log:\n{log}"
    );
    assert_eq!(mock.terminate(), 0);
}

#[test]
fn sighup_reloads_the_config_file_and_a_bad_file_changes_nothing() {
    let (mut mock, api, _admin) = spawn_mock(&[], &[]);
    let write = |path: &std::path::Path, models: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[remotes.gateway]\nbase_url = \"{api}\"\nmodels = [{models}]\n"
        );
        std::fs::write(path, text).expect("write config");
    };
    let file = write_config("");
    write(file.path(), "\"deepseek-chat\"");
    let mut command = lifeboat();
    command.args([
        "serve",
        "--config",
        &file.path().display().to_string(),
        "--model",
        "none",
    ]);
    let mut server = Running::spawn(command);
    let line = server.wait_for("OpenAI base URL");
    let base = between(&line, "OpenAI base URL ", ' ').trim().to_string();
    lifeboat::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let models = || -> usize {
        runtime.block_on(async {
            let list: Value = reqwest::get(format!("{base}/models"))
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            list["data"].as_array().map_or(0, Vec::len)
        })
    };
    assert_eq!(models(), 1);
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    write(file.path(), "\"deepseek-chat\", \"deepseek-reasoner\"");
    hup(server.child.id());
    server.wait_for("SIGHUP: configuration reloaded");
    assert_eq!(models(), 2);
    std::fs::write(file.path(), "[server]\nlisen = 1\n").expect("write");
    hup(server.child.id());
    let line = server.wait_for("SIGHUP: reload failed");
    assert!(line.contains("unknown field"), "{line}");
    assert_eq!(models(), 2, "a bad file changes nothing");
    assert_eq!(server.terminate(), 0);
    assert_eq!(mock.terminate(), 0);
}

//! Config parsing, defaults, validation messages and overrides.

use std::collections::HashMap;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "test.toml")
}

#[test]
fn empty_file_gives_defaults() {
    let config = parse("").expect("empty config parses");
    assert_eq!(config, Config::default());
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    config.validate().expect("defaults are valid");
}

#[test]
fn example_file_is_valid() {
    let text = include_str!("../../lifeboat.example.toml");
    let config = parse(text).expect("example parses");
    config.validate().expect("example validates");
    assert_eq!(
        config.remotes["deepseek"].api_key_env.as_deref(),
        Some("DEEPSEEK_API_KEY")
    );
}

#[test]
fn durations_are_human_readable() {
    let config =
        parse("[remotes.g]\nbase_url = \"http://x/v1\"\nfirst_token_timeout = \"1m 30s\"\n").expect("parses");
    assert_eq!(config.remotes["g"].first_token_timeout, Duration::from_secs(90));
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").expect_err("unknown key");
    let text = err.to_string();
    assert!(text.starts_with("test.toml: line 3"), "{text}");
    assert!(text.contains("unknown field `lisen`"), "{text}");
}

#[test]
fn wrong_type_names_the_key_path() {
    let err = parse("[remotes.g]\nbase_url = \"http://x/v1\"\nidle_timeout = \"soon\"\n")
        .expect_err("bad duration");
    let text = err.to_string();
    assert!(text.contains("remotes.g.idle_timeout"), "{text}");
    let err = parse("[server]\nmax_body_bytes = \"big\"\n").expect_err("bad type");
    assert!(err.to_string().contains("server.max_body_bytes"), "{err}");
}

#[test]
fn fallback_chains_are_checked_for_unknown_remotes_cycles_and_depth() {
    let head = "[remotes.a]\nbase_url = \"http://a/v1\"\n[remotes.b]\nbase_url = \"http://b/v1\"\n\
                [[routes]]\nname = \"chat\"\nremote = \"a\"\n";
    let check = |fallbacks: &str| {
        parse(&format!("{head}fallbacks = {fallbacks}\n"))
            .expect("parses")
            .validate()
            .map_err(|e| e.to_string())
    };
    check(r#"[{ remote = "b" }]"#).expect("a valid chain");
    let err = check(r#"[{ remote = "z" }]"#).expect_err("unknown");
    assert!(
        err.starts_with("routes[0].fallbacks[0].remote: no remote named \"z\""),
        "{err}"
    );
    let err = check(r#"[{ remote = "b" }, { remote = "a" }]"#).expect_err("cycle");
    assert!(
        err.starts_with("routes[0].fallbacks[1]: a / chat is already earlier"),
        "{err}"
    );
    check(r#"[{ remote = "b" }, { remote = "a", remote_model = "other" }]"#)
        .expect("another model is another target");
    let long = format!("[{}]", [r#"{ remote = "b", remote_model = "x" }"#; 9].join(", "));
    let err = check(&long).expect_err("too deep");
    assert!(err.contains("at most 8"), "{err}");
}

#[test]
fn validate_names_bad_keys() {
    let config = parse("[remotes.g]\nbase_url = \"ftp://x\"\n").expect("parses");
    let err = config.validate().expect_err("ftp refused").to_string();
    assert!(err.starts_with("remotes.g.base_url:"), "{err}");

    let config =
        parse("[remotes.g]\nbase_url = \"http://x/v1\"\napi_key_env = \"sk-123 secret\"\n").expect("parses");
    let err = config
        .validate()
        .expect_err("key in place of env name")
        .to_string();
    assert!(err.starts_with("remotes.g.api_key_env:"), "{err}");

    let config = parse("[[routes]]\nname = \"a\"\nremote = \"nope\"\n").expect("parses");
    let err = config.validate().expect_err("dangling remote").to_string();
    assert!(err.starts_with("routes[0].remote:"), "{err}");

    let config = parse(
        "[remotes.g]\nbase_url = \"http://x/v1\"\nmodels = [\"m\"]\n[[routes]]\nname = \"n\"\naliases = [\"m\"]\nremote = \"g\"\n",
    )
    .expect("parses");
    let err = config.validate().expect_err("duplicate name").to_string();
    assert!(err.starts_with("routes[0].aliases[0]:"), "{err}");

    for (local, key) in [
        ("default_max_tokens = 0", "local.default_max_tokens:"),
        ("max_n = 0", "local.max_n:"),
        ("max_n = 129", "local.max_n:"),
        ("stalled_client_timeout = \"0s\"", "local.stalled_client_timeout:"),
    ] {
        let config = parse(&format!("[local]\n{local}\n")).expect("parses");
        let err = config.validate().expect_err(local).to_string();
        assert!(err.starts_with(key), "{err}");
    }
    for (router, key) in [
        ("backoff_min = \"0s\"", "router.backoff_min:"),
        (
            "backoff_min = \"2s\"\nbackoff_max = \"1s\"",
            "router.backoff_max:",
        ),
    ] {
        let config = parse(&format!("[router]\n{router}\n")).expect("parses");
        let err = config.validate().expect_err(router).to_string();
        assert!(err.starts_with(key), "{err}");
    }
    let config = parse("[local]\nstalled_client_timeout = \"2m\"\n").expect("humantime");
    assert_eq!(config.local.stalled_client_timeout, Duration::from_secs(120));
}
#[test]
fn several_gateway_keys_are_checked() {
    let remote = "[remotes.g]\nbase_url = \"http://x/v1\"\n";
    let config = parse(&format!(
        "{remote}api_key_envs = [\"K1\", \"K2\"]\nkey_cooldown = \"2m\"\n"
    ))
    .expect("parses");
    config.validate().expect("two keys");
    assert_eq!(config.remotes["g"].api_key_envs, ["K1", "K2"]);
    assert_eq!(config.remotes["g"].key_cooldown, Duration::from_secs(120));
    assert_eq!(RemoteConfig::default().key_cooldown, Duration::from_secs(60));
    for (keys, at, says) in [
        (
            "api_key_envs = [\"K1\", \"sk-live-123\"]",
            "remotes.g.api_key_envs[1]:",
            "never hold the key",
        ),
        (
            "api_key_envs = [\"K1\", \"K1\"]",
            "remotes.g.api_key_envs[1]:",
            "already listed as api_key_envs[0]",
        ),
        (
            "api_key_env = \"K0\"\napi_key_envs = [\"K1\"]",
            "remotes.g.api_key_envs:",
            "not api_key_env and api_key_envs",
        ),
        (
            "api_key_envs = [\"K1\"]\napi_key_file = \"/k\"",
            "remotes.g.api_key_file:",
            "not api_key_envs and api_key_file",
        ),
        (
            "api_key_env = \"K0\"\napi_key_file = \"/k\"",
            "remotes.g.api_key_file:",
            "not api_key_env and api_key_file",
        ),
        (
            "api_key_envs = [\"K1\"]\nkey_cooldown = \"0s\"",
            "remotes.g.key_cooldown:",
            "greater than 0",
        ),
    ] {
        let config = parse(&format!("{remote}{keys}\n")).expect("parses");
        let err = config.validate().expect_err(keys).to_string();
        assert!(err.starts_with(at) && err.contains(says), "{keys}: {err}");
    }

    // The flag names the key: it replaces the file's list.
    let mut config = parse(&format!("{remote}api_key_envs = [\"K1\", \"K2\"]\n")).expect("parses");
    config
        .apply(&Overrides {
            remote_api_key_env: Some("K3".into()),
            ..Overrides::default()
        })
        .expect("applies");
    config.validate().expect("one source left");
    assert_eq!(config.remotes["g"].api_key_env.as_deref(), Some("K3"));
    assert!(config.remotes["g"].api_key_envs.is_empty());
}

#[test]
fn egress_policies_are_checked() {
    let local_only = "[[routes]]\nname = \"private\"\negress = \"local-only\"\n";
    let config = parse(local_only).expect("parses");
    let err = config.validate().expect_err("no local model").to_string();
    assert!(err.starts_with("routes[0].egress:"), "{err}");
    let config = parse(&format!("[local]\nmodel = \"m\"\n{local_only}")).expect("parses");
    config.validate().expect("local-only with a local model");
    let err = parse("[[routes]]\nname = \"x\"\negress = \"everywhere\"\n").expect_err("bad value");
    assert!(err.to_string().contains("routes[0].egress"), "{err}");
}

#[test]
fn overrides_beat_the_file() {
    let mut config = parse("[server]\nlisten = \"127.0.0.1:1\"\n[remotes.g]\nbase_url = \"http://a/v1\"\n")
        .expect("parses");
    config
        .apply(&Overrides {
            listen: Some("127.0.0.1:2".parse().expect("addr")),
            remote_url: Some("http://b/v1".into()),
            remote_api_key_env: Some("KEY".into()),
            remote_models: vec!["m".into()],
            ..Overrides::default()
        })
        .expect("applies");
    assert_eq!(config.server.listen.port(), 2);
    assert_eq!(config.remotes["g"].base_url, "http://b/v1");
    assert_eq!(config.remotes["g"].api_key_env.as_deref(), Some("KEY"));
    assert_eq!(config.remotes["g"].models, vec!["m".to_string()]);
}

#[test]
fn remote_flags_create_a_remote_when_the_file_has_none() {
    let mut config = Config::default();
    config
        .apply(&Overrides {
            remote_url: Some("http://b/v1".into()),
            ..Overrides::default()
        })
        .expect("applies");
    assert_eq!(config.remotes[DEFAULT_REMOTE_NAME].base_url, "http://b/v1");
}

#[test]
fn secrets_are_redacted_and_missing_ones_named() {
    let mut env = HashMap::new();
    env.insert("GW".to_string(), "sk-very-secret".to_string());
    let secret = resolve_secret(&env, "remotes.g.api_key_env", "GW").expect("set");
    assert_eq!(secret.expose(), "sk-very-secret");
    assert!(!format!("{secret:?} {secret}").contains("sk-very"));
    let err = resolve_secret(&env, "remotes.g.api_key_env", "MISSING").expect_err("unset");
    assert_eq!(
        err.to_string(),
        "remotes.g.api_key_env: environment variable MISSING is not set"
    );
}

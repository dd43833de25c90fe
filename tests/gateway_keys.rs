//! Several keys for one gateway, over real sockets: a key that is rate-limited or out of
//! credit hands the same request to the next key (the router sees one attempt, no
//! failover), a refused key is parked until its cooldown ends, every key parked fails
//! over at once, the probe uses an unparked key, and `/metrics` counts calls per key by
//! fingerprint, never by the key.

use crate::common;

use std::{collections::BTreeMap, collections::HashMap, sync::Arc, time::Duration};

use common::{TestApp, chat_body, spawn_app_with};
use lifeboat::{
    backend::Backend,
    config::{Config, FallbackConfig, RouteConfig, Secret},
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
    upstream::{RemoteBackend, keys::GatewayKey},
};

/// A mock where `faulty` is answered in `mode` and `good` is served, and lifeboat with
/// both keys on `gateway` (faulty first), probes off so every call is a request.
async fn two_keys(faulty: &str, good: &str, mode: FaultMode, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let settings = MockSettings {
        key_faults: BTreeMap::from([(faulty.to_string(), mode)]),
        ..MockSettings::default()
    };
    let env = HashMap::from([
        ("GW_KEY_A".to_string(), faulty.to_string()),
        ("GW_KEY_B".to_string(), good.to_string()),
    ]);
    spawn_app_with(
        settings,
        |config| {
            let gateway = config.remotes.get_mut("gateway").expect("gateway");
            gateway.api_key_envs = vec!["GW_KEY_A".into(), "GW_KEY_B".into()];
            config.router.probe_interval = Duration::ZERO;
            tweak(config);
        },
        env,
    )
    .await
}

/// Ask once; the serving backend and the attempts the router counted.
async fn ask(app: &TestApp) -> (String, String) {
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let header = |name: &str| response.headers()[name].to_str().expect("ascii").to_string();
    (header("x-lifeboat-backend"), header("x-lifeboat-attempts"))
}

/// The value of `name{labels}` in the Prometheus text, 0 when absent.
fn metric(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("a number"))
}

fn fingerprint(key: &str) -> String {
    Secret::new(key).fingerprint()
}

#[tokio::test]
async fn a_rate_limited_or_spent_key_hands_the_request_to_the_next_key() {
    for (mode, tag) in [(FaultMode::Http429, "429"), (FaultMode::Http402, "402")] {
        let (a, b) = (format!("sk-keys-{tag}-a-1f2e"), format!("sk-keys-{tag}-b-3d4c"));
        let app = two_keys(&a, &b, mode, |_| {}).await;
        for _ in 0..4 {
            // One attempt as the router sees it, served by the gateway: no failover.
            assert_eq!(ask(&app).await, ("gateway".to_string(), "1".to_string()), "{tag}");
        }
        let faulty_calls = app.mock.requests_in(mode);
        // 429 only rotates: key A is tried again by every other request. 402 parks it.
        let expected = if mode == FaultMode::Http429 { 2 } else { 1 };
        assert_eq!(faulty_calls, expected, "{tag}");
        assert_eq!(
            app.mock.requests_in(FaultMode::None),
            4,
            "{tag}: key B served all"
        );

        let text = app.get("/metrics").await.text().await.expect("metrics");
        let calls = |key: &str| {
            let labels = format!(r#"backend="gateway",key="{}""#, fingerprint(key));
            metric(&text, "lifeboat_gateway_key_requests_total", &labels)
        };
        assert_eq!((calls(&a), calls(&b)), (expected, 4), "{tag}: {text}");
        assert!(
            !text.contains(&a) && !text.contains(&b),
            "a key leaked into /metrics"
        );
    }
}

#[tokio::test]
async fn a_refused_key_is_parked_until_its_cooldown_ends() {
    const COOLDOWN: Duration = Duration::from_millis(1200);
    let (a, b) = ("sk-keys-401-a-9e8d", "sk-keys-401-b-7c6b");
    let app = two_keys(a, b, FaultMode::Http401, |config| {
        config.remotes.get_mut("gateway").expect("gateway").key_cooldown = COOLDOWN;
    })
    .await;
    for _ in 0..6 {
        assert_eq!(ask(&app).await.0, "gateway");
    }
    assert_eq!(
        app.mock.requests_in(FaultMode::Http401),
        1,
        "parked after one 401"
    );
    assert_eq!(app.mock.requests_in(FaultMode::None), 6);

    tokio::time::sleep(COOLDOWN + Duration::from_millis(200)).await;
    // Back in the rotation: the request that starts on it is refused again, parks it again,
    // and is still served by the other key.
    for _ in 0..2 {
        assert_eq!(ask(&app).await.0, "gateway");
    }
    assert_eq!(app.mock.requests_in(FaultMode::Http401), 2);
    let text = app.get("/metrics").await.text().await.expect("metrics");
    let labels = format!(r#"backend="gateway",key="{}",status="401""#, fingerprint(a));
    assert_eq!(
        metric(&text, "lifeboat_gateway_key_parked_total", &labels),
        2,
        "{text}"
    );
}

#[tokio::test]
async fn every_key_spent_fails_over_to_the_next_target_at_once() {
    let (a, b) = ("sk-keys-all-a-5a4b", "sk-keys-all-b-3c2d");
    let backup = Arc::new(
        MockUpstream::start(MockSettings::default())
            .await
            .expect("backup"),
    );
    let backup_url = backup.url();
    let app = two_keys(a, b, FaultMode::Http402, move |config| {
        config.remotes.insert(
            "backup".into(),
            lifeboat::config::RemoteConfig {
                base_url: backup_url,
                ..lifeboat::config::RemoteConfig::default()
            },
        );
        config.routes.push(RouteConfig {
            name: "chat".into(),
            remote: "gateway".into(),
            remote_model: Some("deepseek-chat".into()),
            fallbacks: vec![FallbackConfig {
                remote: "backup".into(),
                remote_model: None,
            }],
            ..RouteConfig::default()
        });
    })
    .await;
    // Key B is out of credit too.
    app.mock.update_settings(|s| {
        s.key_faults.insert(b.to_string(), FaultMode::Http402);
    });
    let mut body = chat_body(false);
    body["model"] = "chat".into();
    for round in 0..2 {
        let response = app.post_json("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200, "round {round}");
        assert_eq!(response.headers()["x-lifeboat-backend"], "backup");
        assert_eq!(
            response.headers()["x-lifeboat-fallback-reason"],
            "payment_required"
        );
    }
    // Both keys were tried once in the first request and parked; the second request
    // found none usable and failed over without calling the gateway.
    assert_eq!(app.mock.requests_in(FaultMode::Http402), 2);
    assert_eq!(backup.requests_in(FaultMode::None), 2);
}

#[tokio::test]
async fn the_probe_uses_a_key_that_is_not_parked() {
    let (a, b) = ("sk-keys-probe-a-1a2b", "sk-keys-probe-b-3c4d");
    let mock = MockUpstream::start(MockSettings {
        key_faults: BTreeMap::from([(a.to_string(), FaultMode::Http401)]),
        ..MockSettings::default()
    })
    .await
    .expect("mock");
    let config = mock.gateway_config().remotes["gateway"].clone();
    let keys = [a, b]
        .iter()
        .enumerate()
        .map(|(i, key)| GatewayKey::new(Secret::new(*key), format!("remotes.gateway.api_key_envs[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .expect("keys");
    let backend = RemoteBackend::with_keys("gateway", &config, keys).expect("backend");
    lifeboat::upstream::install_crypto_provider();

    // The first probe uses key A, is refused, and parks it; the next ones use key B.
    let first = backend.probe().await.expect_err("key A is refused");
    assert_eq!(first.status, Some(401));
    for _ in 0..2 {
        backend.probe().await.expect("key B works");
        let last = mock.last_request().expect("a request");
        assert_eq!(
            last.authorization.as_deref(),
            Some(format!("Bearer {b}").as_str())
        );
    }
    assert_eq!(mock.requests_in(FaultMode::Http401), 1);
}

#[tokio::test]
async fn a_reload_reads_the_keys_again() {
    let (a, b) = ("sk-keys-reload-a-6e5f", "sk-keys-reload-b-4a3b");
    let app = two_keys(a, b, FaultMode::Http401, |_| {}).await;
    let config = || {
        let mut config = common::test_config(&app.mock);
        let gateway = config.remotes.get_mut("gateway").expect("gateway");
        gateway.api_key_envs = vec!["GW_KEY_A".into(), "GW_KEY_B".into()];
        config.router.probe_interval = Duration::ZERO;
        config
    };
    // Two names for one key would be rotated and parked as two: refused, nothing changes.
    let same = HashMap::from([
        ("GW_KEY_A".to_string(), b.to_string()),
        ("GW_KEY_B".to_string(), b.to_string()),
    ]);
    let err = app
        .state
        .reload(&config(), &same)
        .expect_err("one key twice")
        .to_string();
    assert_eq!(
        err,
        "remotes.gateway.api_key_envs[1]: holds the same key as remotes.gateway.api_key_envs[0]"
    );

    // The refused key is replaced in its variable; SIGHUP (here: reload) picks it up.
    let fixed = "sk-keys-reload-a2-2c1d";
    let env = HashMap::from([
        ("GW_KEY_A".to_string(), fixed.to_string()),
        ("GW_KEY_B".to_string(), b.to_string()),
    ]);
    app.state.reload(&config(), &env).expect("reload");
    for _ in 0..4 {
        assert_eq!(ask(&app).await.0, "gateway");
    }
    assert_eq!(app.mock.requests_in(FaultMode::Http401), 0, "the old key is gone");
    let text = app.get("/metrics").await.text().await.expect("metrics");
    let labels = format!(r#"backend="gateway",key="{}""#, fingerprint(fixed));
    assert_eq!(
        metric(&text, "lifeboat_gateway_key_requests_total", &labels),
        2,
        "{text}"
    );
}

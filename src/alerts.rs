//! Breaker alerts, an output adapter beside `metrics`: every state change is POSTed as
//! JSON (Slack-compatible `text`, plus severity, backend, reason, availability and a
//! recommended action) to the configured webhooks, from a background task, so a slow
//! webhook never delays a request. A leaf: it knows state names, not the router's types.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::config::Secret;

/// One breaker state change, as the router reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerAlert<'a> {
    /// The backend whose breaker moved.
    pub backend: &'a str,
    /// The state it left (`closed`, `open`, `half_open`).
    pub from: &'a str,
    /// The state it entered.
    pub to: &'a str,
    /// Why, e.g. `3 consecutive failures, last: unauthorized`.
    pub reason: &'a str,
    /// Share of successful requests over the last minute, hour and day, when known.
    pub availability: [Option<f64>; 3],
}

/// Alerts waiting to be sent; beyond this they are dropped (and logged), never awaited.
const QUEUE: usize = 256;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends alerts in the background.
#[derive(Debug, Clone)]
pub struct Alerter {
    tx: mpsc::Sender<Value>,
}

/// What to do about a breaker that opened for `reason` (an error kind).
pub fn recommended_action(reason: &str) -> &'static str {
    if reason.contains("unauthorized") {
        "The gateway rejects lifeboat's API key: rotate the key in the variable named by api_key_env and send SIGHUP or restart."
    } else if reason.contains("payment_required") {
        "The gateway account is out of credit: top it up. Traffic is served locally meanwhile."
    } else if reason.contains("rate_limited") {
        "The gateway is rate-limiting lifeboat: raise the limit or move more traffic to the local model."
    } else if reason.contains("not_found") {
        "The gateway does not know the routed model name: fix remote_model in the route table."
    } else {
        "The gateway is failing or unreachable: check its status page. Traffic is served locally meanwhile."
    }
}

/// The alert body for a breaker change.
pub fn alert_body(alert: &BreakerAlert<'_>) -> Value {
    let BreakerAlert {
        backend,
        from,
        to,
        reason,
        availability: [minute, hour, day],
    } = *alert;
    let severity = if to == "open" { "critical" } else { "info" };
    let action = match to {
        "open" => recommended_action(reason),
        "half_open" => "None: lifeboat is sending one trial request.",
        _ => "None: the backend recovered and takes traffic again.",
    };
    let percent = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{:.1}%", v * 100.0));
    let text = format!(
        "[lifeboat] {backend}: breaker {from} → {to} ({reason}). Availability 1m {} / 1h {}. {action}",
        percent(minute),
        percent(hour),
    );
    json!({
        "text": text,
        "severity": severity,
        "backend": backend,
        "from": from,
        "to": to,
        "reason": reason,
        "availability": {
            "1m": minute,
            "1h": hour,
            "24h": day,
        },
        "recommended_action": action,
        "at_unix_ms": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    })
}

impl Alerter {
    /// Start the sender task for `webhooks` (resolved secrets: the URLs carry tokens).
    pub fn spawn(webhooks: Vec<Secret>) -> Alerter {
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        crate::upstream::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build();
        tokio::spawn(async move {
            let Ok(client) = client else {
                tracing::error!("cannot build the alert HTTP client; alerts are disabled");
                return;
            };
            while let Some(alert) = rx.recv().await {
                crate::tasks::survive("alerts", post_alert(&client, &webhooks, &alert)).await;
            }
        });
        Alerter { tx }
    }

    /// Queue an alert; never waits.
    pub fn send(&self, alert: Value) {
        if self.tx.try_send(alert).is_err() {
            tracing::warn!("alert queue full; an alert was dropped");
        }
    }
}

/// POST `alert` to every webhook in turn.
async fn post_alert(client: &reqwest::Client, webhooks: &[Secret], alert: &Value) {
    for (i, url) in webhooks.iter().enumerate() {
        match client.post(url.expose()).json(alert).send().await {
            Ok(response) if response.status().is_success() => {}
            // The URL is a secret: name the webhook by position only.
            Ok(response) => {
                tracing::warn!(webhook = i, status = %response.status(), "alert webhook refused")
            }
            Err(err) => {
                tracing::warn!(webhook = i, error = %err.without_url(), "alert webhook failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_alerts_are_critical_with_an_action() {
        let body = alert_body(&BreakerAlert {
            backend: "gateway",
            from: "closed",
            to: "open",
            reason: "3 consecutive failures, last: unauthorized",
            availability: [Some(0.25), Some(0.9), None],
        });
        assert_eq!(body["severity"], "critical");
        assert!(
            body["recommended_action"]
                .as_str()
                .expect("action")
                .contains("rotate the key")
        );
        let text = body["text"].as_str().expect("text");
        assert!(
            text.contains("gateway: breaker closed → open") && text.contains("1m 25.0%"),
            "{text}"
        );
        let closed = alert_body(&BreakerAlert {
            backend: "gateway",
            from: "half_open",
            to: "closed",
            reason: "trial succeeded",
            availability: [None; 3],
        });
        assert_eq!(closed["severity"], "info");
        assert_eq!(closed["availability"]["1m"], Value::Null);
    }
}

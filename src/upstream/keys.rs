//! A remote's API keys (key rotation): used round-robin, the next one tried when the
//! gateway rate-limits a key or says it is out of credit, and a key it refuses (401) or
//! bills to an empty account (402) parked for a cooldown.
//!
//! Keys are shown only by their [`Secret::fingerprint`] (metrics, logs) or by the config
//! path that named them; the value leaves this module only as an `Authorization` header.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use reqwest::header::HeaderValue;
use tokio::time::Instant;

use crate::{
    backend::{BackendError, ErrorKind},
    config::Secret,
};

/// One key and where it came from.
#[derive(Debug, Clone)]
pub struct GatewayKey {
    pub secret: Secret,
    /// The config path that named it, e.g. `remotes.gw.api_key_envs[1]`; safe to log.
    pub source: String,
    /// [`Secret::fingerprint`], kept so every call does not hash the key again.
    pub fingerprint: String,
    /// `Bearer <key>`, marked sensitive (its `Debug` shows no value); built once, so a key
    /// that cannot be a header value is refused when the config loads, not per request.
    pub(super) header: HeaderValue,
}

impl GatewayKey {
    /// `Err` (naming no part of the key) when the key cannot be sent in a header.
    pub fn new(secret: Secret, source: impl Into<String>) -> Result<GatewayKey, String> {
        let mut header = HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
            .map_err(|_| "the key contains characters not allowed in an HTTP header".to_string())?;
        header.set_sensitive(true);
        Ok(GatewayKey {
            fingerprint: secret.fingerprint(),
            secret,
            source: source.into(),
            header,
        })
    }
}

/// What the gateway's answer to a key means for the rest of the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Not about the key (a success, a 5xx, a timeout, a bad request): stop here.
    Keep,
    /// 429: this key is rate-limited now; another key may not be. Not parked, since a
    /// rate limit lifts in seconds and round-robin already spreads the next requests.
    TryNext,
    /// 401 (the key is revoked or wrong) or 402 (its account is out of credit): park it
    /// for the cooldown and try the next key.
    Park,
}

impl KeyVerdict {
    /// The verdict for an HTTP status from the gateway. 403 stays with the router: it
    /// usually means a model or region the account may not use, the same for every key.
    pub fn of_status(status: Option<u16>) -> KeyVerdict {
        match status {
            Some(429) => KeyVerdict::TryNext,
            Some(401 | 402) => KeyVerdict::Park,
            _ => KeyVerdict::Keep,
        }
    }
}

#[derive(Debug)]
struct Slot {
    key: GatewayKey,
    /// Left out until then; `None` when usable. A std mutex: held for a read or a write,
    /// never across an await.
    parked_until: Mutex<Option<Instant>>,
}

impl Slot {
    fn parked(&self, now: Instant) -> bool {
        lock(&self.parked_until).is_some_and(|until| now < until)
    }
}

/// A remote's keys and which of them are parked.
#[derive(Debug)]
pub struct KeyRing {
    slots: Vec<Slot>,
    /// Round-robin position of the next request.
    next: AtomicUsize,
    cooldown: Duration,
    /// The error that parked a key most recently: what an attempt fails with when every
    /// key is parked, so the router sees the gateway's own status and fails over.
    last_parked: Mutex<Option<BackendError>>,
}

impl KeyRing {
    /// `keys` in config order; a key that got 401/402 is left out for `cooldown`.
    pub fn new(keys: Vec<GatewayKey>, cooldown: Duration) -> KeyRing {
        KeyRing {
            slots: keys
                .into_iter()
                .map(|key| Slot {
                    key,
                    parked_until: Mutex::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            cooldown,
            last_parked: Mutex::new(None),
        }
    }

    /// A gateway without a key (a local vLLM, say).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The keys for one attempt: each usable key at most once, starting where the
    /// previous attempt started plus one, so requests spread evenly over the keys.
    pub fn attempt(&self) -> KeyAttempt<'_> {
        let start = match self.slots.len() {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        KeyAttempt {
            ring: self,
            start,
            offered: 0,
        }
    }

    /// The key a health probe uses: the first one in config order that is not parked
    /// (probing with a parked key would only prove again what parked it). With every key
    /// parked, the one whose cooldown ends first: a probe is the only call that can see
    /// the gateway take it back (credit topped up), and [`KeyRing::unpark`] then returns
    /// it to requests at once.
    pub fn probe_key(&self) -> Option<&GatewayKey> {
        let now = Instant::now();
        if let Some(slot) = self.slots.iter().find(|s| !s.parked(now)) {
            return Some(&slot.key);
        }
        self.slots
            .iter()
            .min_by_key(|s| *lock(&s.parked_until))
            .map(|s| &s.key)
    }

    /// Return `key` to use (a probe with it succeeded).
    pub fn unpark(&self, key: &GatewayKey) {
        if let Some(slot) = self.slot(key) {
            *lock(&slot.parked_until) = None;
        }
    }

    /// Leave `key` out for the cooldown because of `error` (a 401 or 402). A lone key is
    /// never parked: there is nothing to rotate to, and the breaker and the probe already
    /// decide when the gateway is called again (parking would keep a recovered gateway
    /// unused for the whole cooldown).
    pub fn park(&self, key: &GatewayKey, backend: &str, error: &BackendError) {
        if self.slots.len() < 2 {
            return;
        }
        let Some(slot) = self.slot(key) else {
            return;
        };
        *lock(&slot.parked_until) = Some(Instant::now() + self.cooldown);
        *lock(&self.last_parked) = Some(error.clone());
        let status = error.status.unwrap_or_default();
        crate::metrics::gateway_key_parked(backend, &key.fingerprint, status);
        // One line per parking, not per request: a parked key is not tried again until
        // the cooldown ends.
        tracing::warn!(
            backend,
            key = %key.fingerprint,
            source = %key.source,
            status,
            cooldown = %humantime::format_duration(self.cooldown),
            "gateway key parked"
        );
    }

    /// The error of an attempt that found every key parked.
    pub fn all_parked_error(&self) -> BackendError {
        let parked = lock(&self.last_parked).clone();
        let mut error = parked
            .unwrap_or_else(|| BackendError::new(ErrorKind::Unauthorized, "upstream refused every key"));
        error.message = format!(
            "every key of this gateway is parked (the last one after: {})",
            error.message
        );
        error
    }

    /// Whether `key` is parked now.
    pub fn is_parked(&self, key: &GatewayKey) -> bool {
        self.slot(key).is_some_and(|s| s.parked(Instant::now()))
    }

    fn slot(&self, key: &GatewayKey) -> Option<&Slot> {
        // Keys are distinct (a twin is refused at load), so the fingerprint names one slot.
        self.slots.iter().find(|s| s.key.fingerprint == key.fingerprint)
    }
}

/// The keys one attempt may still try; see [`KeyRing::attempt`].
#[derive(Debug)]
pub struct KeyAttempt<'r> {
    ring: &'r KeyRing,
    start: usize,
    /// Slots looked at so far, from `start` on.
    offered: usize,
}

impl<'r> KeyAttempt<'r> {
    /// The next key to try, skipping parked ones; `None` when none is left. Parking is
    /// checked now, not when the attempt began, so a key parked by a concurrent request
    /// is skipped too.
    pub fn next_key(&mut self) -> Option<&'r GatewayKey> {
        let slots = &self.ring.slots;
        let now = Instant::now();
        while self.offered < slots.len() {
            let slot = &slots[(self.start + self.offered) % slots.len()];
            self.offered += 1;
            if !slot.parked(now) {
                return Some(&slot.key);
            }
        }
        None
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain data that a panic cannot leave half-written.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(n: usize, cooldown: Duration) -> KeyRing {
        let keys = (0..n)
            .map(|i| {
                GatewayKey::new(
                    Secret::new(format!("sk-key-{i}")),
                    format!("remotes.g.api_key_envs[{i}]"),
                )
                .expect("a header-safe key")
            })
            .collect();
        KeyRing::new(keys, cooldown)
    }

    fn exposed(key: Option<&GatewayKey>) -> Option<&str> {
        key.map(|k| k.secret.expose())
    }

    fn status_error(status: u16) -> BackendError {
        let mut error = BackendError::new(ErrorKind::PaymentRequired, format!("upstream answered {status}"));
        error.status = Some(status);
        error
    }

    #[test]
    fn requests_take_the_keys_in_turn_and_an_attempt_offers_each_once() {
        let ring = ring_of(3, Duration::from_secs(60));
        let firsts: Vec<_> = (0..4)
            .map(|_| exposed(ring.attempt().next_key()).map(str::to_string))
            .collect();
        assert_eq!(
            firsts,
            ["sk-key-0", "sk-key-1", "sk-key-2", "sk-key-0"].map(|k| Some(k.to_string()))
        );
        let mut attempt = ring.attempt();
        let offered: Vec<_> = std::iter::from_fn(|| attempt.next_key().map(|k| k.secret.expose())).collect();
        assert_eq!(offered, ["sk-key-1", "sk-key-2", "sk-key-0"]);
        assert!(ring_of(0, Duration::from_secs(1)).attempt().next_key().is_none());
    }

    #[test]
    fn statuses_decide_rotation_and_parking() {
        assert_eq!(KeyVerdict::of_status(Some(429)), KeyVerdict::TryNext);
        assert_eq!(KeyVerdict::of_status(Some(402)), KeyVerdict::Park);
        assert_eq!(KeyVerdict::of_status(Some(401)), KeyVerdict::Park);
        for other in [Some(200), Some(400), Some(403), Some(500), Some(503), None] {
            assert_eq!(KeyVerdict::of_status(other), KeyVerdict::Keep, "{other:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_key_is_skipped_until_its_cooldown_ends() {
        let ring = ring_of(2, Duration::from_secs(60));
        let mut attempt = ring.attempt();
        let first = attempt.next_key().expect("a key").clone();
        ring.park(&first, "g", &status_error(401));
        assert!(ring.is_parked(&first));
        // The same attempt goes on with the other key; the next attempts use only it.
        assert_eq!(exposed(attempt.next_key()), Some("sk-key-1"));
        assert!(attempt.next_key().is_none());
        for _ in 0..3 {
            let mut attempt = ring.attempt();
            assert_eq!(exposed(attempt.next_key()), Some("sk-key-1"));
            assert!(attempt.next_key().is_none());
        }
        assert_eq!(exposed(ring.probe_key()), Some("sk-key-1"));

        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(ring.is_parked(&first), "still within the cooldown");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!ring.is_parked(&first), "back after the cooldown");
        assert_eq!(exposed(ring.probe_key()), Some("sk-key-0"));
        let mut attempt = ring.attempt();
        let both: Vec<_> = std::iter::from_fn(|| attempt.next_key().map(|k| k.secret.expose())).collect();
        assert_eq!(both.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_key_parked_fails_with_the_last_status() {
        let ring = ring_of(2, Duration::from_secs(30));
        let mut attempt = ring.attempt();
        let a = attempt.next_key().expect("a").clone();
        ring.park(&a, "g", &status_error(401));
        let b = attempt.next_key().expect("b").clone();
        ring.park(&b, "g", &status_error(402));
        assert!(ring.attempt().next_key().is_none());
        let error = ring.all_parked_error();
        assert_eq!(error.status, Some(402));
        assert!(
            error.message.starts_with("every key of this gateway is parked"),
            "{}",
            error.message
        );
        assert!(!error.message.contains("sk-key"), "{}", error.message);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(ring.attempt().next_key().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_key_parked_the_probe_takes_the_first_to_return_and_can_unpark_it() {
        let ring = ring_of(2, Duration::from_secs(30));
        let mut attempt = ring.attempt();
        let a = attempt.next_key().expect("a").clone();
        ring.park(&a, "g", &status_error(402));
        tokio::time::advance(Duration::from_secs(5)).await;
        let b = attempt.next_key().expect("b").clone();
        ring.park(&b, "g", &status_error(402));
        let probe = ring.probe_key().expect("a key to probe with").clone();
        assert_eq!(
            probe.secret.expose(),
            a.secret.expose(),
            "parked first, back first"
        );
        ring.unpark(&probe);
        assert!(!ring.is_parked(&a) && ring.is_parked(&b));
        assert_eq!(exposed(ring.attempt().next_key()), Some("sk-key-0"));
    }

    #[test]
    fn a_lone_key_is_never_parked() {
        let ring = ring_of(1, Duration::from_secs(30));
        let key = ring.attempt().next_key().expect("key").clone();
        ring.park(&key, "g", &status_error(401));
        assert!(!ring.is_parked(&key));
        assert!(ring.attempt().next_key().is_some());
    }

    #[test]
    fn keys_are_shown_by_fingerprint_only() {
        let key = GatewayKey::new(Secret::new("sk-very-secret"), "remotes.g.api_key_envs[0]").expect("key");
        assert_eq!(key.fingerprint.len(), 8);
        assert!(key.fingerprint.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key.fingerprint, Secret::new("sk-very-secret").fingerprint());
        assert_ne!(key.fingerprint, Secret::new("sk-other").fingerprint());
        assert!(!format!("{key:?}").contains("sk-very"));
        let err = GatewayKey::new(Secret::new("sk-line\nbreak"), "k").expect_err("not a header");
        assert!(!err.contains("sk-line"), "{err}");
    }
}

//! Per-backend health record, fed by every attempt (passive) and by the background probe
//! (active): availability over 1 min / 1 h / 24 h, TTFT EWMA, and the last 100 events.
//! Read by `/health` and `/metrics`; decisions stay with the breaker.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

/// Events kept for `/health`.
const RECENT_EVENTS: usize = 100;
/// Availability is kept in one bucket per minute for a day.
const BUCKET: Duration = Duration::from_secs(60);
const BUCKETS: usize = 24 * 60;
/// Weight of the newest sample in the TTFT moving average.
const EWMA_ALPHA: f64 = 0.2;

/// Where an observation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client request's attempt.
    Request,
    /// The background probe.
    Probe,
}

impl Source {
    /// Label for `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Request => "request",
            Source::Probe => "probe",
        }
    }
}

/// One observation.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthEvent {
    /// When it was seen.
    pub at: SystemTime,
    /// Request or probe.
    pub source: Source,
    /// `ok` or an error kind (`ErrorKind::as_str`).
    pub outcome: &'static str,
    /// Time to the first token (requests) or to the answer (probes).
    pub latency: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Minute index since the record started.
    minute: u64,
    ok: u64,
    total: u64,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    buckets: Vec<Bucket>,
    recent: VecDeque<HealthEvent>,
    ttft_ewma: Option<f64>,
    latency_ewma: Option<f64>,
}

/// Availability over the standard windows, as fractions (None: no traffic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Availability {
    /// Over the last minute; `None` without observations.
    pub last_minute: Option<f64>,
    /// Over the last hour.
    pub last_hour: Option<f64>,
    /// Over the last day.
    pub last_day: Option<f64>,
}

/// A backend's health record.
#[derive(Debug, Clone)]
pub struct HealthRecord {
    inner: Arc<Mutex<Inner>>,
}

impl Default for HealthRecord {
    fn default() -> Self {
        HealthRecord::new()
    }
}

impl HealthRecord {
    /// An empty record.
    pub fn new() -> HealthRecord {
        HealthRecord {
            inner: Arc::new(Mutex::new(Inner {
                started: Instant::now(),
                buckets: vec![Bucket::default(); BUCKETS],
                recent: VecDeque::with_capacity(RECENT_EVENTS),
                ttft_ewma: None,
                latency_ewma: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn minute(inner: &Inner) -> u64 {
        (Instant::now().duration_since(inner.started).as_secs() / BUCKET.as_secs()) + 1
    }

    /// Record one outcome; `ok` requests also update the TTFT average.
    pub fn observe(&self, source: Source, outcome: &'static str, latency: Duration) {
        let mut inner = self.lock();
        let minute = Self::minute(&inner);
        let bucket = &mut inner.buckets[(minute % BUCKETS as u64) as usize];
        if bucket.minute != minute {
            *bucket = Bucket {
                minute,
                ok: 0,
                total: 0,
            };
        }
        bucket.total += 1;
        if outcome == "ok" {
            bucket.ok += 1;
            if source == Source::Request {
                let sample = latency.as_secs_f64();
                inner.ttft_ewma = Some(match inner.ttft_ewma {
                    Some(avg) => avg + EWMA_ALPHA * (sample - avg),
                    None => sample,
                });
            }
        }
        if inner.recent.len() == RECENT_EVENTS {
            inner.recent.pop_front();
        }
        inner.recent.push_back(HealthEvent {
            at: SystemTime::now(),
            source,
            outcome,
            latency,
        });
    }

    fn window(inner: &Inner, minutes: u64) -> Option<f64> {
        let now = Self::minute(inner);
        let (ok, total) = inner
            .buckets
            .iter()
            .filter(|b| b.minute > 0 && b.minute + minutes > now)
            .fold((0, 0), |(ok, total), b| (ok + b.ok, total + b.total));
        (total > 0).then(|| ok as f64 / total as f64)
    }

    /// Success shares over the last minute, hour and day.
    pub fn availability(&self) -> Availability {
        let inner = self.lock();
        Availability {
            last_minute: Self::window(&inner, 1),
            last_hour: Self::window(&inner, 60),
            last_day: Self::window(&inner, BUCKETS as u64),
        }
    }

    /// Record the whole latency of a request that completed.
    pub fn observe_latency(&self, latency: Duration) {
        let mut inner = self.lock();
        let sample = latency.as_secs_f64();
        inner.latency_ewma = Some(match inner.latency_ewma {
            Some(avg) => avg + EWMA_ALPHA * (sample - avg),
            None => sample,
        });
    }

    /// Moving average of the whole latency of completed requests.
    pub fn latency_ewma(&self) -> Option<Duration> {
        self.lock().latency_ewma.map(Duration::from_secs_f64)
    }

    /// Moving average of the time to first token of successful requests.
    pub fn ttft_ewma(&self) -> Option<Duration> {
        self.lock().ttft_ewma.map(Duration::from_secs_f64)
    }
    /// 95th percentile of the time to first token of the recent successful requests;
    /// `None` with fewer than 10 samples.
    pub fn ttft_p95(&self) -> Option<Duration> {
        let inner = self.lock();
        let mut samples: Vec<Duration> = inner
            .recent
            .iter()
            .filter(|e| e.source == Source::Request && e.outcome == "ok")
            .map(|e| e.latency)
            .collect();
        if samples.len() < 10 {
            return None;
        }
        samples.sort();
        let rank = ((samples.len() as f64) * 0.95).ceil() as usize;
        samples.get(rank.saturating_sub(1)).copied()
    }

    /// The last events, oldest first.
    pub fn recent(&self) -> Vec<HealthEvent> {
        self.lock().recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn availability_windows_slide() {
        let record = HealthRecord::new();
        assert_eq!(record.availability().last_minute, None);
        for _ in 0..3 {
            record.observe(Source::Request, "ok", Duration::from_millis(100));
        }
        record.observe(Source::Probe, "server_error", Duration::from_millis(5));
        assert_eq!(record.availability().last_minute, Some(0.75));
        tokio::time::advance(Duration::from_secs(120)).await;
        record.observe(Source::Request, "ok", Duration::from_millis(100));
        let a = record.availability();
        assert_eq!(a.last_minute, Some(1.0), "the failure left the 1-minute window");
        assert_eq!(a.last_hour, Some(0.8));
        tokio::time::advance(Duration::from_secs(2 * 3600)).await;
        record.observe(Source::Request, "timeout_first_token", Duration::ZERO);
        let a = record.availability();
        assert_eq!(a.last_hour, Some(0.0));
        assert_eq!(
            a.last_day.map(|v| (v * 100.0).round()),
            Some(67.0),
            "4 of 6 in the day"
        );
    }

    #[test]
    fn recent_events_are_bounded_and_ttft_is_averaged() {
        let record = HealthRecord::new();
        for i in 0..150 {
            record.observe(Source::Request, "ok", Duration::from_millis(100 + i % 2 * 100));
        }
        assert_eq!(record.recent().len(), 100);
        assert_eq!(record.ttft_p95(), Some(Duration::from_millis(200)));
        let ttft = record.ttft_ewma().expect("ewma").as_millis();
        assert!((100..=200).contains(&ttft), "{ttft}");
    }
}

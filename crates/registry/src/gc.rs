//! Garbage collection in the registry: on a cron schedule, on demand through the admin route,
//! and at once when the store goes over its size cap or the disk under its free-space floor.
//! The collection itself is the store's (`kache_store::Store::collect`); this runs it, one at
//! a time, and reports every run in the logs, the metrics and the admin route.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use kache_store::{GcOptions, GcReport, Limits, Observer, Storage, StoreError};
use tokio::sync::Notify;

use crate::Metrics;

/// When scheduled collections run: a cron expression in UTC, or never.
#[derive(Debug, Clone)]
pub struct Schedule(Option<croner::Cron>);

impl Schedule {
    /// Never: only on demand and under pressure.
    pub fn off() -> Self {
        Schedule(None)
    }

    /// The first time after `now` the schedule fires.
    pub fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        let cron = self.0.as_ref()?;
        let now = now.to_zoned(TimeZone::UTC);
        cron.find_next_occurrence(&now, false)
            .ok()
            .map(|z| z.timestamp())
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;

    /// A five-field cron expression (minute hour day-of-month month day-of-week, in UTC), with
    /// an optional leading seconds field; or `off`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("off") {
            return Ok(Schedule::off());
        }
        let fields = t.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "{s:?} is not a cron expression: it needs five fields (minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\"), or \"off\""
            ));
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(t)
            .map(|c| Schedule(Some(c)))
            .map_err(|e| format!("{s:?} is not a cron expression: {e}"))
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(c) => f.write_str(c.pattern.as_str()),
            None => f.write_str("off"),
        }
    }
}

/// What started a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    /// The admin route (`kache gc`).
    Request,
    /// The store went over its size cap or the disk under its free-space floor.
    Pressure,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Request => "request",
            Trigger::Pressure => "pressure",
        }
    }
}

/// How the registry collects.
#[derive(Debug, Clone)]
pub struct GcConfig {
    pub schedule: Schedule,
    /// Nothing written or used more recently than this is swept (`--gc-grace`).
    pub grace: Duration,
    /// Upload sessions untouched this long are removed (`--upload-timeout`).
    pub upload_timeout: Duration,
    pub limits: Limits,
    /// Blobs per sweep transaction; the store's default unless a test slows a sweep down.
    pub batch: Option<usize>,
    /// The share of one core a scheduled or requested collection may take (`--gc-cpu`); one
    /// that pressure starts (the disk is filling) takes what it needs.
    pub duty: f64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            schedule: "0 3 * * *".parse().expect("a valid default"),
            grace: Duration::from_secs(3600),
            upload_timeout: Duration::from_secs(3600),
            limits: Limits::default(),
            batch: None,
            duty: kache_store::DEFAULT_DUTY,
        }
    }
}

/// Runs collections, one at a time, and keeps the last report.
#[derive(Debug)]
pub struct Collector {
    store: Arc<dyn Storage>,
    config: Mutex<GcConfig>,
    metrics: Metrics,
    last: Mutex<Option<GcReport>>,
    pressure: Arc<Notify>,
}

/// After a collection that could not get the store within its limits (everything left is
/// pinned, in use or within the grace period), the next one pressure triggers waits this long:
/// the store must not be marked over and over.
const PRESSURE_PAUSE: Duration = Duration::from_secs(60);
/// How often the limits are checked when nothing signals pressure.
const PRESSURE_CHECK: Duration = Duration::from_secs(15);

impl Collector {
    pub(crate) fn new(store: Arc<dyn Storage>, metrics: Metrics) -> Arc<Self> {
        let pressure = Arc::new(Notify::new());
        let c = Arc::new(Collector {
            store: store.clone(),
            config: Mutex::new(GcConfig::default()),
            metrics: metrics.clone(),
            last: Mutex::new(None),
            pressure: pressure.clone(),
        });
        store.set_observer(Arc::new(Events { metrics, pressure }));
        c
    }

    pub(crate) fn configure(&self, config: GcConfig) {
        self.store.set_limits(config.limits);
        *self.config.lock().expect("gc config poisoned") = config;
    }

    fn config(&self) -> GcConfig {
        self.config.lock().expect("gc config poisoned").clone()
    }

    /// The report of the last collection (dry runs included), if one ran since start.
    pub fn last(&self) -> Option<GcReport> {
        self.last.lock().expect("gc report poisoned").clone()
    }

    /// Runs one collection now; `why` names what asked for it in the logs.
    pub async fn run_once(&self, dry_run: bool, why: Trigger) -> Result<GcReport, StoreError> {
        let config = self.config();
        let mut opts = GcOptions {
            grace: config.grace,
            dry_run,
            upload_timeout: Some(config.upload_timeout),
            duty: match why {
                Trigger::Pressure => 1.0,
                Trigger::Schedule | Trigger::Request => config.duty,
            },
            ..GcOptions::default()
        };
        let why = why.as_str();
        if let Some(b) = config.batch {
            opts.batch = b;
        }
        let result = self.store.clone().collect(opts).await;
        let m = &self.metrics;
        let label = match (&result, dry_run) {
            (Err(StoreError::Busy), _) => return result,
            (Err(_), _) => "failure",
            (Ok(_), true) => "dry_run",
            (Ok(_), false) => "success",
        };
        m.gc_runs
            .get_or_create(&crate::metrics::ResultLabel { result: label })
            .inc();
        match &result {
            Ok(r) => {
                m.gc_duration.observe(r.duration_seconds);
                if !dry_run {
                    m.gc_freed_bytes.inc_by(r.removed_bytes);
                    m.gc_freed_blobs.inc_by(r.removed_blobs);
                    m.gc_evicted_images.inc_by(r.evicted_images.len() as u64);
                    m.gc_last_success.set(r.started_at as i64);
                }
                m.store_bytes.set(r.store_bytes as i64);
                tracing::info!(
                    why,
                    dry_run,
                    removed_blobs = r.removed_blobs,
                    removed_manifests = r.removed_manifests,
                    removed_bytes = r.removed_bytes,
                    evicted = ?r.evicted_images,
                    kept_in_use = r.kept_in_use,
                    expired_uploads = r.expired_uploads,
                    pressure = ?r.pressure,
                    seconds = r.duration_seconds,
                    "garbage collection done"
                );
                if let Some(p) = &r.pressure
                    && p.unmet_bytes > 0
                {
                    tracing::warn!(
                        reason = %p.reason,
                        unmet_bytes = p.unmet_bytes,
                        "the store stays over its limits: everything left is pinned or in use"
                    );
                }
                *self.last.lock().expect("gc report poisoned") = Some(r.clone());
            }
            Err(e) => tracing::error!(why, error = %e, "garbage collection failed"),
        }
        result
    }

    /// Collects on the schedule, and whenever the store is over its limits, until dropped.
    pub async fn run(self: Arc<Self>) {
        let mut next = self.config().schedule.next_after(Timestamp::now());
        let mut quiet_until = tokio::time::Instant::now();
        loop {
            let until_next = next.map(|t| {
                let left = t
                    .as_millisecond()
                    .saturating_sub(Timestamp::now().as_millisecond());
                Duration::from_millis(left.max(0) as u64)
            });
            let scheduled = async {
                match until_next {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let pressure = async {
                tokio::time::sleep_until(quiet_until).await;
                loop {
                    tokio::select! {
                        _ = self.pressure.notified() => {}
                        _ = tokio::time::sleep(PRESSURE_CHECK) => {}
                    }
                    match self.store.pressure() {
                        Ok(Some(_)) => return,
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot read the store's free space"),
                    }
                }
            };
            tokio::select! {
                _ = scheduled => {
                    let _ = self.run_once(false, Trigger::Schedule).await;
                    // From the time it fires, not from now: a run longer than the period skips
                    // the runs it overlapped.
                    next = self.config().schedule.next_after(Timestamp::now());
                }
                _ = pressure => {
                    let met = match self.run_once(false, Trigger::Pressure).await {
                        Ok(r) => r.pressure.is_none_or(|p| p.unmet_bytes == 0),
                        Err(_) => false,
                    };
                    if !met {
                        quiet_until = tokio::time::Instant::now() + PRESSURE_PAUSE;
                    }
                }
            }
        }
    }
}

/// What the store tells the registry.
#[derive(Debug)]
struct Events {
    metrics: Metrics,
    pressure: Arc<Notify>,
}

impl Observer for Events {
    fn blob_not_stored(&self, digest: &kache_oci::Digest, reason: &str) {
        tracing::warn!(%digest, reason, "served from the upstream without caching it");
        self.metrics.blobs_not_stored.inc();
    }

    fn pressure(&self) {
        self.pressure.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn schedules() {
        let daily: Schedule = "0 3 * * *".parse().unwrap();
        assert_eq!(
            daily.next_after(at("2026-12-05T02:59:59Z")),
            Some(at("2026-12-05T03:00:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-12-05T03:00:00Z")),
            Some(at("2026-12-06T03:00:00Z")),
            "strictly after"
        );
        let every_second: Schedule = "* * * * * *".parse().unwrap();
        assert_eq!(
            every_second.next_after(at("2026-12-05T10:00:00.5Z")),
            Some(at("2026-12-05T10:00:01Z"))
        );
        assert_eq!(Schedule::off().next_after(Timestamp::now()), None);
        assert!("OFF".parse::<Schedule>().unwrap().0.is_none());
        assert_eq!(daily.to_string(), "0 3 * * *");
    }

    #[test]
    fn bad_schedules_say_why() {
        for bad in ["", "0 3 * *", "61 * * * *", "every day", "0 3 * * * * 2027"] {
            let e = bad.parse::<Schedule>().unwrap_err();
            assert!(e.contains("not a cron expression"), "{bad:?}: {e}");
        }
    }
}

//! A CachedImage's phase transitions, decided without I/O: what the reconcile writes and
//! records, from what it saw. `images.rs` carries the decisions out around its one call to the
//! registry (the warm call), in three steps: [`invalid`] (a source image that is not
//! normalised fails at once), [`caching`] (whether to warm, and what to show first), [`settle`]
//! (the status after the warm call, or without one).
//!
//! ```text
//!   Pending ──warm──▶ Caching ──ok──▶ Cached ◀──a pod uses it again──▶ Expiring
//!                        │              │ ▲                               │
//!                        └──fails──▶ Failed ──ok (retried with backoff)   └─ deleted at
//!                                                                            spec.expiresAt
//! ```

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kache_api::{CachedImageStatus, Condition, Phase, UsedBy};

use crate::events::Kind;

/// An event to record on the CachedImage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub kind: Kind,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            kind: Kind::Normal,
            reason,
            message: message.into(),
        }
    }

    pub fn warning(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            kind: Kind::Warning,
            reason,
            message: message.into(),
        }
    }
}

/// What the reconcile saw, besides the CachedImage's own status.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub now: Timestamp,
    /// The normalised source image.
    pub image: String,
    /// The pods that use it.
    pub used_by: UsedBy,
    /// The platforms of the cluster's nodes (`linux/amd64`...).
    pub platforms: Vec<String>,
    /// When it goes, if no pod uses it ([`crate::decide::expiry`]).
    pub expires_at: Option<Timestamp>,
    /// How often a cached image is confirmed with the registry.
    pub resync: Duration,
}

/// What a warm call gave, in the terms of the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warmed {
    pub digest: String,
    pub bytes: u64,
    /// The platforms of [`Seen::platforms`] the cache now serves.
    pub platforms: Vec<String>,
}

/// The status to write and the events to record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settled {
    pub status: CachedImageStatus,
    pub notes: Vec<Note>,
    /// When to look again (the resync, or sooner to expire on time).
    pub requeue: Duration,
}

/// A source image that is not a normalised reference: the status that says so, and the event
/// the first time.
pub(crate) fn invalid(old: &CachedImageStatus, image: &str) -> (CachedImageStatus, Option<Note>) {
    let message = format!(
        "spec.sourceImage {image:?} is not a normalised image reference (like docker.io/library/nginx:1.27)"
    );
    let mut status = old.clone();
    status.phase = Phase::Failed;
    status.message = Some(message.clone());
    let note = (*old != status).then(|| Note::warning("Failed", message));
    (status, note)
}

/// Whether the cache already holds the image as the cluster needs it.
fn cached(old: &CachedImageStatus) -> bool {
    matches!(old.phase, Phase::Cached | Phase::Expiring) && old.digest.is_some()
}

/// Whether a warm call is due, and what to show before it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Caching {
    /// Cached, confirmed within the resync, for every node's platform: nothing to warm.
    Current,
    /// A warm call is due; for a Pending image, the Caching status and event to show first.
    Due(Option<Box<(CachedImageStatus, Note)>>),
}

/// [`Caching`] for an image whose status is `old`. A retry after a failure keeps Failed until it succeeds, so that
/// status writes (each a watch event and a reconcile) cannot chase each other.
pub(crate) fn caching(old: &CachedImageStatus, seen: &Seen) -> Caching {
    let synced_recently = old
        .last_sync
        .as_ref()
        .is_some_and(|t| t.0.as_second() + seen.resync.as_secs() as i64 > seen.now.as_second());
    let platforms_known = seen.platforms.iter().all(|p| old.platforms.contains(p));
    if cached(old) && synced_recently && platforms_known {
        return Caching::Current;
    }
    if old.phase != Phase::Pending {
        return Caching::Due(None);
    }
    let mut status = old.clone();
    status.used_by = seen.used_by.clone();
    status.phase = Phase::Caching;
    let note = Note::normal(
        "Caching",
        format!("caching {} for {}", seen.image, seen.platforms.join(", ")),
    );
    Caching::Due(Some(Box::new((status, note))))
}

/// The status after the warm call (`None` when none was due), its events, and when to look
/// again. Cached and Expiring follow `expires_at` either way.
pub(crate) fn settle(
    old: &CachedImageStatus,
    seen: &Seen,
    warmed: Option<Result<Warmed, String>>,
) -> Settled {
    let mut status = old.clone();
    status.used_by = seen.used_by.clone();
    let mut notes = Vec::new();
    match warmed {
        None => {}
        Some(Ok(w)) => {
            if !cached(old) {
                notes.push(Note::normal(
                    "Cached",
                    format!("{} is {}", seen.image, w.digest),
                ));
            }
            status.digest = Some(w.digest);
            status.size = Some(i64::try_from(w.bytes).unwrap_or(i64::MAX));
            status.platforms = w.platforms;
            status.last_sync = Some(Time(seen.now));
            status.message = None;
            status.phase = Phase::Cached;
        }
        Some(Err(message)) => {
            status.phase = Phase::Failed;
            status.message = Some(message.clone());
            notes.push(Note::warning("Failed", message));
        }
    }
    if status.phase == Phase::Cached && seen.expires_at.is_some() {
        status.phase = Phase::Expiring;
    } else if status.phase == Phase::Expiring && seen.expires_at.is_none() {
        status.phase = Phase::Cached;
    }
    set_ready(&mut status, old, seen.now);
    let mut requeue = seen.resync;
    if let Some(t) = seen.expires_at {
        let left = t.as_second().saturating_sub(seen.now.as_second()).max(1);
        requeue = requeue.min(Duration::from_secs(left as u64));
    }
    Settled {
        status,
        notes,
        requeue,
    }
}

/// The Ready condition: True while the cache serves the image, its transition time kept while
/// it holds.
fn set_ready(status: &mut CachedImageStatus, old: &CachedImageStatus, now: Timestamp) {
    let ready = matches!(status.phase, Phase::Cached | Phase::Expiring);
    let value = if ready { "True" } else { "False" };
    let previous = old.conditions.iter().find(|c| c.type_ == "Ready");
    let since = match previous {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => Time(now),
    };
    status.conditions = vec![Condition {
        type_: "Ready".into(),
        status: value.into(),
        last_transition_time: since,
        reason: Some(status.phase.as_str().into()),
        message: status.message.clone(),
    }];
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn seen(expires_at: Option<i64>) -> Seen {
        Seen {
            now: at(100_000),
            image: "docker.io/library/nginx:1.27".into(),
            used_by: UsedBy::default(),
            platforms: vec!["linux/amd64".into()],
            expires_at: expires_at.map(at),
            resync: 6 * HOUR,
        }
    }

    fn status(phase: Phase, synced: Option<i64>, platforms: &[&str]) -> CachedImageStatus {
        CachedImageStatus {
            phase,
            digest: matches!(phase, Phase::Cached | Phase::Expiring | Phase::Failed)
                .then(|| "sha256:aa".into()),
            last_sync: synced.map(|s| Time(at(s))),
            platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
            ..CachedImageStatus::default()
        }
    }

    fn ok() -> Option<Result<Warmed, String>> {
        Some(Ok(Warmed {
            digest: "sha256:bb".into(),
            bytes: 10,
            platforms: vec!["linux/amd64".into()],
        }))
    }

    fn reasons(notes: &[Note]) -> Vec<&'static str> {
        notes.iter().map(|n| n.reason).collect()
    }

    #[test]
    fn when_to_warm() {
        let fresh = Some(100_000 - 60);
        let stale = Some(100_000 - 7 * 3600);
        for (old, warm, announce, why) in [
            (
                status(Phase::Pending, None, &[]),
                true,
                true,
                "never cached",
            ),
            (
                status(Phase::Failed, None, &[]),
                true,
                false,
                "a retry stays Failed",
            ),
            (
                status(Phase::Caching, None, &[]),
                true,
                false,
                "a warm cut short",
            ),
            (
                status(Phase::Cached, fresh, &["linux/amd64"]),
                false,
                false,
                "current",
            ),
            (
                status(Phase::Expiring, fresh, &["linux/amd64"]),
                false,
                false,
                "current",
            ),
            (
                status(Phase::Cached, stale, &["linux/amd64"]),
                true,
                false,
                "resync due",
            ),
            (
                status(Phase::Cached, fresh, &["linux/arm64"]),
                true,
                false,
                "a new platform",
            ),
        ] {
            let plan = caching(&old, &seen(None));
            assert_eq!(plan != Caching::Current, warm, "{why}");
            let shown = match plan {
                Caching::Due(shown) => shown.map(|b| *b),
                Caching::Current => None,
            };
            assert_eq!(shown.is_some(), announce, "{why}");
            if let Some((status, note)) = shown {
                assert_eq!(status.phase, Phase::Caching);
                assert_eq!(note.reason, "Caching");
                assert_eq!(
                    note.message,
                    "caching docker.io/library/nginx:1.27 for linux/amd64"
                );
            }
        }
    }

    #[test]
    fn transitions() {
        let fresh = Some(100_000 - 60);
        let failed = || Some(Err("upstream: timeout".to_owned()));
        for (old, warmed, expires, phase, notes) in [
            (
                status(Phase::Pending, None, &[]),
                ok(),
                None,
                Phase::Cached,
                vec!["Cached"],
            ),
            (
                status(Phase::Pending, None, &[]),
                failed(),
                None,
                Phase::Failed,
                vec!["Failed"],
            ),
            (
                status(Phase::Failed, None, &[]),
                ok(),
                None,
                Phase::Cached,
                vec!["Cached"],
            ),
            // A resync of a cached image says nothing when it works, and fails loudly.
            (
                status(Phase::Cached, fresh, &[]),
                ok(),
                None,
                Phase::Cached,
                vec![],
            ),
            (
                status(Phase::Cached, fresh, &[]),
                failed(),
                None,
                Phase::Failed,
                vec!["Failed"],
            ),
            // Expiry follows spec.expiresAt, with or without a warm call.
            (
                status(Phase::Cached, fresh, &[]),
                None,
                Some(200_000),
                Phase::Expiring,
                vec![],
            ),
            (
                status(Phase::Expiring, fresh, &[]),
                None,
                None,
                Phase::Cached,
                vec![],
            ),
            (
                status(Phase::Pending, None, &[]),
                ok(),
                Some(200_000),
                Phase::Expiring,
                vec!["Cached"],
            ),
            (
                status(Phase::Failed, None, &[]),
                None,
                Some(200_000),
                Phase::Failed,
                vec![],
            ),
        ] {
            let s = settle(&old, &seen(expires), warmed.clone());
            let case = format!("{:?} + {warmed:?} (expires {expires:?})", old.phase);
            assert_eq!(s.status.phase, phase, "{case}");
            assert_eq!(reasons(&s.notes), notes, "{case}");
            let ready = &s.status.conditions[0];
            assert_eq!(
                ready.status,
                if matches!(phase, Phase::Cached | Phase::Expiring) {
                    "True"
                } else {
                    "False"
                },
                "{case}"
            );
            assert_eq!(ready.reason.as_deref(), Some(phase.as_str()));
        }
    }

    #[test]
    fn a_warm_call_fills_the_status_and_a_failure_keeps_what_was_cached() {
        let s = settle(&status(Phase::Pending, None, &[]), &seen(None), ok());
        assert_eq!(s.status.digest.as_deref(), Some("sha256:bb"));
        assert_eq!(s.status.size, Some(10));
        assert_eq!(s.status.platforms, ["linux/amd64"]);
        assert_eq!(s.status.last_sync, Some(Time(at(100_000))));
        assert_eq!(s.status.message, None);
        assert_eq!(
            s.notes[0].message,
            "docker.io/library/nginx:1.27 is sha256:bb"
        );

        let old = status(Phase::Cached, Some(1), &["linux/amd64"]);
        let s = settle(&old, &seen(None), Some(Err("boom".into())));
        assert_eq!(
            s.status.digest, old.digest,
            "the digest cached before stays"
        );
        assert_eq!(s.status.message.as_deref(), Some("boom"));
        assert_eq!(s.notes[0].kind, Kind::Warning);
        assert_eq!(s.status.conditions[0].message.as_deref(), Some("boom"));
    }

    #[test]
    fn ready_keeps_its_transition_time_while_it_holds() {
        let mut old = status(Phase::Cached, Some(1), &["linux/amd64"]);
        old.conditions = vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            last_transition_time: Time(at(5)),
            reason: Some("Cached".into()),
            message: None,
        }];
        let s = settle(&old, &seen(Some(200_000)), None);
        assert_eq!(s.status.conditions[0].last_transition_time, Time(at(5)));
        let s = settle(&old, &seen(None), Some(Err("x".into())));
        assert_eq!(
            s.status.conditions[0].last_transition_time,
            Time(at(100_000))
        );
    }

    #[test]
    fn requeue_in_time_to_expire() {
        assert_eq!(
            settle(&CachedImageStatus::default(), &seen(None), None).requeue,
            6 * HOUR
        );
        let soon = settle(&CachedImageStatus::default(), &seen(Some(100_060)), None);
        assert_eq!(soon.requeue, Duration::from_secs(60));
        let past = settle(&CachedImageStatus::default(), &seen(Some(1)), None);
        assert_eq!(past.requeue, Duration::from_secs(1));
    }

    #[test]
    fn an_invalid_source_image_fails_once() {
        let (status, note) = invalid(&CachedImageStatus::default(), "nginx");
        assert_eq!(status.phase, Phase::Failed);
        assert!(note.is_some_and(|n| n.kind == Kind::Warning && n.message.contains("\"nginx\"")));
        let (again, note) = invalid(&status, "nginx");
        assert_eq!(again, status);
        assert_eq!(note, None, "no second event for the same failure");
    }
}

//! Leader election on a `coordination.k8s.io/v1` Lease, by hand: kube 5 has none of its own.
//!
//! A candidate takes the Lease when it is absent or its holder let it lapse, and renews it
//! every `duration / 3`. Every write carries the resourceVersion it read, so two candidates
//! racing for one Lease cannot both win: the loser gets 409 and reads again. A leader that
//! cannot renew within `duration` steps down before anyone else may take over. A leader that
//! stops deletes its Lease ([`release`]): another replica takes over at its next round instead
//! of after `duration`, and an uninstall leaves no Lease behind.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client};

/// Where the Lease is and who this replica is.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
}

/// What a look at the Lease decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Leader,
    Follower,
}

/// Whether the candidate `me` may take a Lease held by `holder` last renewed at `renewed`.
pub fn may_take(
    holder: Option<&str>,
    renewed: Option<Timestamp>,
    lease_secs: i64,
    me: &str,
    now: Timestamp,
) -> bool {
    match (holder, renewed) {
        (None, _) | (Some(""), _) => true,
        (Some(h), _) if h == me => true,
        (Some(_), None) => true,
        (Some(_), Some(t)) => t.as_second().saturating_add(lease_secs) < now.as_second(),
    }
}

/// One election round: create, renew or take the Lease if this replica may.
pub async fn try_acquire(client: &Client, cfg: &LeaseConfig) -> kube::Result<Held> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = Timestamp::now();
    let lease_secs = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    let spec = |acquired: Option<MicroTime>, transitions: Option<i32>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(lease_secs),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: transitions,
        ..Default::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec(None, Some(0))),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Held::Leader),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Held::Follower),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let current = lease.spec.clone().unwrap_or_default();
            let holder = current.holder_identity.as_deref();
            let renewed = current.renew_time.as_ref().map(|t| t.0);
            let held_secs = i64::from(current.lease_duration_seconds.unwrap_or(lease_secs));
            if !may_take(holder, renewed, held_secs, &cfg.identity, now) {
                return Ok(Held::Follower);
            }
            let mine = holder == Some(cfg.identity.as_str());
            let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
            let acquired = if mine { current.acquire_time } else { None };
            lease.spec = Some(spec(acquired, Some(transitions)));
            // replace() sends the resourceVersion read above: a concurrent writer wins, we 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Held::Leader),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Held::Follower),
                Err(e) => Err(e),
            }
        }
    }
}

/// Deletes the Lease if this replica still holds it: only the Lease as read (a precondition on
/// its resourceVersion), so a replica that took it meanwhile keeps it.
pub async fn release(client: &Client, cfg: &LeaseConfig) -> kube::Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let Some(lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if holder != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.metadata.resource_version.clone(),
            uid: lease.metadata.uid.clone(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&cfg.name, &dp).await {
        Ok(_) => Ok(()),
        // Gone, or changed hands since it was read: not ours to delete.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_the_lease() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let now = t(1_000);
        assert!(may_take(None, None, 15, "a", now));
        assert!(may_take(Some(""), Some(now), 15, "a", now));
        assert!(may_take(Some("a"), Some(now), 15, "a", now), "renewal");
        assert!(
            !may_take(Some("b"), Some(t(990)), 15, "a", now),
            "b holds it"
        );
        assert!(
            !may_take(Some("b"), Some(t(985)), 15, "a", now),
            "at the limit, still b's"
        );
        assert!(may_take(Some("b"), Some(t(984)), 15, "a", now), "lapsed");
    }
}

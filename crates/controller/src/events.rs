//! Kubernetes Events about CachedImages (`kubectl describe cachedimage` shows them).
//!
//! kube-runtime's `Recorder` files events about a cluster-scoped object in `default`, which
//! Kubernetes before 1.22 refuses for `events.k8s.io` events ("involvedObject.namespace: does
//! not match event.namespace"); every version takes them in `kube-system`. A repeat of the same
//! event within a few minutes updates its series instead of adding an object, as kubelet and
//! kube-runtime do, so a retried failure does not fill etcd.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::Mutex;

/// Where events about cluster-scoped objects go.
const NAMESPACE: &str = "kube-system";
/// How long a repeat counts as the same event.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// The API server's limit on `note`.
const NOTE_MAX: usize = 1024;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Normal,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: String,
    reason: String,
    note: String,
}

struct Sent {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes events; shared by every reconcile.
pub(crate) struct Events {
    client: Client,
    controller: String,
    instance: String,
    sent: Mutex<HashMap<Key, Sent>>,
}

impl Events {
    pub(crate) fn new(client: Client, controller: &str, instance: &str) -> Self {
        Events {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            sent: Mutex::default(),
        }
    }

    /// Records an event about `regarding`, a cluster-scoped object.
    pub(crate) async fn publish(
        &self,
        regarding: ObjectReference,
        kind: Kind,
        reason: &str,
        note: &str,
    ) -> kube::Result<()> {
        let now = Timestamp::now();
        let note = truncate(note, NOTE_MAX);
        let key = Key {
            regarding: regarding.name.clone().unwrap_or_default(),
            reason: reason.to_owned(),
            note: note.clone(),
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let mut sent = self.sent.lock().await;
        sent.retain(|_, s| now.duration_since(s.last).as_secs() < SERIES_WINDOW.as_secs() as i64);
        if let Some(s) = sent.get_mut(&key) {
            let count = s.count.saturating_add(1);
            let patch = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }});
            match api
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    s.count = count;
                    s.last = now;
                    return Ok(());
                }
                // Gone (deleted by hand, or past the API server's event TTL): start anew.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    sent.remove(&key);
                }
                Err(e) => return Err(e),
            }
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NAMESPACE.to_owned()),
                ..Default::default()
            },
            action: Some(reason.to_owned()),
            reason: Some(reason.to_owned()),
            event_time: Some(MicroTime(now)),
            note: Some(note),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match kind {
                    Kind::Normal => "Normal",
                    Kind::Warning => "Warning",
                }
                .to_owned(),
            ),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        sent.insert(
            key,
            Sent {
                name,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

/// At most `max` bytes, cut on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_character_boundaries() {
        assert_eq!(truncate("short", 1024), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, NOTE_MAX);
        assert!(cut.len() <= NOTE_MAX);
        assert_eq!(cut.len(), 1024);
        assert_eq!(truncate("aé", 2), "a");
    }
}

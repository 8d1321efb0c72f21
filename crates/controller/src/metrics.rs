//! `kache_controller_*` metrics.

use std::sync::{Arc, Mutex};

use kache_api::{CachedImage, NodeImageSet, Phase};
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabel {
    set: String,
}

/// The controller's metrics; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    cached_images: Family<PhaseLabel, Gauge>,
    reconcile_errors: Counter,
    is_leader: Gauge,
    /// The leader's CachedImage cache, counted at scrape time (not after every reconcile, which
    /// would walk every image for each one).
    images: Arc<Mutex<Option<Store<CachedImage>>>>,
    set_images: Family<SetLabel, Gauge>,
    set_desired: Family<SetLabel, Gauge>,
    set_ready: Family<SetLabel, Gauge>,
    set_failures: Family<SetLabel, Gauge>,
    /// The leader's NodeImageSet cache, read at scrape time.
    sets: Arc<Mutex<Option<Store<NodeImageSet>>>>,
}

impl ControllerMetrics {
    /// Registers the metrics under `kache_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ControllerMetrics::default();
        let sub = registry.sub_registry_with_prefix("kache_controller");
        sub.register(
            "cached_images",
            "CachedImages by phase",
            m.cached_images.clone(),
        );
        sub.register(
            "reconcile_errors",
            "CachedImage reconciles that failed",
            m.reconcile_errors.clone(),
        );
        sub.register(
            "is_leader",
            "1 while this replica holds the lease and runs the controllers",
            m.is_leader.clone(),
        );
        let sets = registry.sub_registry_with_prefix("kache_controller_nodeimageset");
        sets.register(
            "images",
            "Images a NodeImageSet names",
            m.set_images.clone(),
        );
        sets.register(
            "desired_nodes",
            "Nodes a NodeImageSet selects",
            m.set_desired.clone(),
        );
        sets.register(
            "ready_nodes",
            "Nodes that hold every image of a NodeImageSet",
            m.set_ready.clone(),
        );
        sets.register(
            "failures",
            "Images a NodeImageSet's nodes (or the cache) miss, with a reason",
            m.set_failures.clone(),
        );
        m
    }

    /// Updates the per-phase counts from the CachedImage cache; a follower reports zeros, so a
    /// sum over replicas is the cluster's count.
    pub fn refresh(&self) {
        let store = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let phases = store.map(|s| {
            s.state()
                .iter()
                .map(|c| c.status.as_ref().map(|s| s.phase).unwrap_or_default())
                .collect::<Vec<_>>()
        });
        self.set_phases(phases.unwrap_or_default());
        let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Sets that went must leave no series behind.
        for family in [
            &self.set_images,
            &self.set_desired,
            &self.set_ready,
            &self.set_failures,
        ] {
            family.clear();
        }
        for set in sets.map(|s| s.state()).unwrap_or_default() {
            let label = SetLabel {
                set: kube::ResourceExt::name_any(set.as_ref()),
            };
            let status = set.status.clone().unwrap_or_default();
            self.set_images
                .get_or_create(&label)
                .set(status.image_count);
            self.set_desired
                .get_or_create(&label)
                .set(status.desired_nodes);
            self.set_ready.get_or_create(&label).set(status.ready_nodes);
            self.set_failures
                .get_or_create(&label)
                .set(status.failures.len() as i64);
        }
    }

    /// The NodeImageSet cache `refresh` reads; `None` when the controllers stop.
    pub(crate) fn count_sets(&self, store: Option<Store<NodeImageSet>>) {
        *self.sets.lock().unwrap_or_else(|e| e.into_inner()) = store;
    }

    /// Sets the per-phase counts (every phase, zero included).
    fn set_phases(&self, phases: impl IntoIterator<Item = Phase>) {
        let mut counts = [0i64; Phase::ALL.len()];
        for p in phases {
            counts[Phase::ALL.iter().position(|x| *x == p).unwrap_or(0)] += 1;
        }
        for (p, n) in Phase::ALL.iter().zip(counts) {
            self.cached_images
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .set(n);
        }
    }

    /// The cache `refresh` counts; `None` when the controllers stop.
    pub(crate) fn count_images(&self, store: Option<Store<CachedImage>>) {
        *self.images.lock().unwrap_or_else(|e| e.into_inner()) = store;
    }

    pub(crate) fn reconcile_error(&self) {
        self.reconcile_errors.inc();
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.is_leader.set(i64::from(leader));
    }
}

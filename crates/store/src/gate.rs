//! The gate: how garbage collection and traffic stay out of each other's way. This is the one
//! place that guarantees it; every other part of the store only follows its three rules.
//!
//! A collection decides from one snapshot of the index which blobs nothing needs, then deletes
//! them while pulls, pushes, pull-through fills and warms go on. Nothing takes a lock across an
//! I/O, nobody waits on the collection, and yet a manifest write that references a blob and a
//! sweep that deletes that blob never both succeed:
//!
//! 1. **Hold before use.** Whatever reports a blob present or makes it reachable passes the gate
//!    for its digest first: a read before it looks the digest up ([`Gate::read`]: HEAD, GET, a
//!    mount's source) and again once it found it ([`Gate::touch`]), and a write
//!    ([`Gate::write`]: a blob installed, a repository linked to it, a manifest that references
//!    it). While a collection runs, the gate adds the digest to the collection's `held` set; a
//!    read that found the blob and every write also record the access time. A write keeps a
//!    [`WriteHold`] until its index transaction has committed.
//! 2. **Start, then look.** A collection [`begins`](Gate::begin) by switching the gate on (the
//!    writes in progress at that instant become held), flushes the access times and only then
//!    opens its index snapshot. A digest used before the switch is either in the snapshot
//!    (its write committed), or held (its write was in progress), or was last used at a time the
//!    collection reads (a candidate must not have been used for the whole grace period).
//! 3. **Claim, then delete.** The sweep [`claims`](Gate::claim) its candidates in small batches:
//!    a digest held since the collection began is skipped, any other becomes *doomed* until the
//!    sweep has committed its index records away and unlinked its file ([`Gate::release`]).
//!    A read of a doomed digest reports it absent (a client gets 404 and uploads it again, a
//!    pull-through fetches it again, a manifest that needs it is refused with
//!    MANIFEST_BLOB_UNKNOWN); a write of a doomed digest waits for that one removal (an index
//!    commit and an unlink, never the collection) and then stores the blob anew.
//!
//! For any digest, the gate's mutex orders the hold and the claim: if the hold comes first the
//! sweep skips the digest, if the claim comes first the holder sees it absent. A blob being
//! fetched by a pull-through flight lives in `tmp/` and is not in the index, so no sweep can
//! see it; its commit is a write like any other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kache_oci::Digest;
use tokio::sync::Notify;

use crate::index::now;

#[derive(Debug, Default)]
struct State {
    /// When each digest was last used, since the last flush into the index.
    access: HashMap<Digest, u64>,
    /// Writes in progress: held from before their index transaction until it commits.
    writing: HashMap<Digest, usize>,
    collection: Option<Collection>,
}

#[derive(Debug, Default)]
struct Collection {
    /// Used since the collection began: never swept by it.
    held: HashSet<Digest>,
    /// Claimed by the sweep and being removed.
    doomed: HashSet<Digest>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    /// Woken whenever doomed digests are released.
    released: Arc<Notify>,
}

/// A write in progress on a digest; dropped once its index transaction has committed.
#[derive(Debug)]
pub(crate) struct WriteHold<'a> {
    gate: &'a Gate,
    digest: Digest,
}

impl Drop for WriteHold<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if let Some(n) = s.writing.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                s.writing.remove(&self.digest);
            }
        }
    }
}

/// A collection is already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("gate poisoned")
    }

    /// A read is about to look `digest` up: false when the sweep is removing it (it is then
    /// absent for the reader). Called before the lookup, so that a lookup that finds the blob
    /// is never followed by its removal.
    pub(crate) fn read(&self, digest: &Digest) -> bool {
        let mut s = self.lock();
        let Some(c) = s.collection.as_mut() else {
            return true;
        };
        if c.doomed.contains(digest) {
            return false;
        }
        if !c.held.contains(digest) {
            c.held.insert(digest.clone());
        }
        true
    }

    /// A read found and served `digest`: records when (what expiry and the grace period read).
    pub(crate) fn touch(&self, digest: &Digest) {
        let mut s = self.lock();
        if let Some(c) = s.collection.as_mut()
            && !c.held.contains(digest)
        {
            c.held.insert(digest.clone());
        }
        s.access.insert(digest.clone(), now());
    }

    /// A write of `digest` (a blob installed or linked): waits while the sweep removes it.
    pub(crate) async fn write(&self, digest: &Digest) -> WriteHold<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the check and the wait wakes it.
            released.as_mut().enable();
            if let Some(hold) = self.try_write(digest) {
                return hold;
            }
            released.await;
        }
    }

    /// A write that refers to `digest` without storing it (a manifest's reference): `None` when
    /// the sweep is removing it.
    pub(crate) fn try_write(&self, digest: &Digest) -> Option<WriteHold<'_>> {
        let mut s = self.lock();
        if let Some(c) = s.collection.as_mut() {
            if c.doomed.contains(digest) {
                return None;
            }
            c.held.insert(digest.clone());
        }
        *s.writing.entry(digest.clone()).or_default() += 1;
        s.access.insert(digest.clone(), now());
        Some(WriteHold {
            gate: self,
            digest: digest.clone(),
        })
    }

    /// Switches the gate on for a collection: the writes in progress are held from now on.
    pub(crate) fn begin(&self) -> Result<(), Busy> {
        let mut s = self.lock();
        if s.collection.is_some() {
            return Err(Busy);
        }
        let held = s.writing.keys().cloned().collect();
        s.collection = Some(Collection {
            held,
            doomed: HashSet::new(),
        });
        Ok(())
    }

    /// Switches the gate off, releasing whatever is still doomed.
    pub(crate) fn end(&self) {
        self.lock().collection = None;
        self.released.notify_waiters();
    }

    /// Claims candidates for removal: returns those not held since the collection began, which
    /// are doomed until [`release`](Self::release).
    pub(crate) fn claim(&self, candidates: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let mut s = self.lock();
        let c = s
            .collection
            .as_mut()
            .expect("claim outside of a collection");
        candidates
            .into_iter()
            .filter(|d| !c.held.contains(d))
            .inspect(|d| {
                c.doomed.insert(d.clone());
            })
            .collect()
    }

    /// The claimed digests are gone (or were kept after all): writers waiting on them go on.
    pub(crate) fn release(&self, claimed: &[Digest]) {
        {
            let mut s = self.lock();
            if let Some(c) = s.collection.as_mut() {
                for d in claimed {
                    c.doomed.remove(d);
                }
            }
        }
        self.released.notify_waiters();
    }

    /// Whether the running collection has seen `digest` used (it will not sweep it).
    pub(crate) fn is_held(&self, digest: &Digest) -> bool {
        self.lock()
            .collection
            .as_ref()
            .is_some_and(|c| c.held.contains(digest))
    }

    /// Takes the access times recorded since the last call.
    pub(crate) fn take_access(&self) -> Vec<(Digest, u64)> {
        self.lock().access.drain().collect()
    }

    /// Puts back access times a failed flush could not write (newer ones win).
    pub(crate) fn restore_access(&self, batch: Vec<(Digest, u64)>) {
        let mut s = self.lock();
        for (d, at) in batch {
            let e = s.access.entry(d).or_insert(at);
            *e = (*e).max(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    #[test]
    fn a_hold_before_the_claim_keeps_the_digest() {
        let g = Gate::default();
        g.begin().unwrap();
        assert!(g.read(&d("a")));
        g.touch(&d("c"));
        assert_eq!(g.claim([d("a"), d("b"), d("c")]), vec![d("b")]);
        g.end();
    }

    #[test]
    fn a_claim_before_the_hold_makes_it_absent() {
        let g = Gate::default();
        g.begin().unwrap();
        assert_eq!(g.claim([d("a")]), vec![d("a")]);
        assert!(!g.read(&d("a")));
        assert!(g.try_write(&d("a")).is_none());
        g.release(&[d("a")]);
        assert!(g.read(&d("a")), "released: usable again");
        g.end();
    }

    #[test]
    fn writes_in_progress_at_the_start_are_held() {
        let g = Gate::default();
        let hold = g.try_write(&d("a")).unwrap();
        g.begin().unwrap();
        drop(hold);
        assert!(g.claim([d("a")]).is_empty());
        assert_eq!(g.begin(), Err(Busy));
        g.end();
        assert_eq!(g.begin(), Ok(()));
    }

    #[test]
    fn outside_a_collection_nothing_is_held() {
        let g = Gate::default();
        assert!(g.read(&d("a")));
        g.touch(&d("a"));
        drop(g.try_write(&d("b")).unwrap());
        g.begin().unwrap();
        assert_eq!(
            g.claim([d("a"), d("b")]).len(),
            2,
            "used before: access times decide"
        );
        let taken: HashSet<Digest> = g.take_access().into_iter().map(|(d, _)| d).collect();
        assert_eq!(taken, HashSet::from([d("a"), d("b")]));
    }

    #[tokio::test]
    async fn a_write_of_a_doomed_digest_waits_for_its_release() {
        let g = Arc::new(Gate::default());
        g.begin().unwrap();
        g.claim([d("a")]);
        let writer = {
            let g = g.clone();
            tokio::spawn(async move {
                let _hold = g.write(&d("a")).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!writer.is_finished(), "waits while doomed");
        g.release(&[d("a")]);
        tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("released writers go on")
            .unwrap();
    }
}

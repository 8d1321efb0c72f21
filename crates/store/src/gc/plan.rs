//! What a collection decides from its snapshot, without I/O: the roots, what each reaches, and
//! which images to evict.

use std::collections::HashSet;
use std::time::Duration;

use kache_oci::Digest;

use super::Pace;
use crate::index::{BlobId, Eviction, KeptRef, View};

/// A root of the mark.
#[derive(Debug)]
struct Root {
    repo: u32,
    manifest: BlobId,
    /// How to evict it, if it may be.
    evict: Option<Eviction>,
    label: String,
    last_pulled: u64,
}

/// What a collection decided from its snapshot.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub marked_manifests: u64,
    pub marked_blobs: u64,
    /// Blobs to sweep, garbage first.
    pub candidates: Vec<BlobId>,
    pub evictions: Vec<(Eviction, String)>,
    pub unmet: u64,
}

impl Plan {
    /// Decides, from `view` at time `now`: `need` bytes must be freed (0 when within limits);
    /// `held` says whether a digest was used since the collection began.
    pub(crate) fn make(
        view: &View,
        now: u64,
        grace: Duration,
        need: u64,
        held: &dyn Fn(&Digest) -> bool,
        pace: &mut Pace,
    ) -> Plan {
        let grace = grace.as_secs();
        // Whole seconds: with a grace of 0 nothing is recent.
        let recent = |t: u64| t.saturating_add(grace) > now;
        let roots = roots(view, &recent);

        // Each root's reach counted once per blob: a blob nothing counts is garbage, and evicting
        // an image frees the blobs whose count it brings to zero.
        let mut count = vec![0u32; view.blobs.len()];
        let mut manifests = HashSet::new();
        let mut scratch = Reach::default();
        for r in &roots {
            pace.tick();
            for &b in scratch.of(view, r, &mut manifests) {
                count[b as usize] += 1;
            }
        }
        let mut plan = Plan {
            marked_manifests: manifests.len() as u64,
            marked_blobs: count.iter().filter(|&&c| c > 0).count() as u64,
            ..Plan::default()
        };
        let mut garbage_bytes = 0;
        for (id, b) in view.blobs.iter().enumerate() {
            if count[id] == 0 && !recent(b.created.max(b.access)) {
                plan.candidates.push(id as BlobId);
                garbage_bytes += b.size;
            }
        }
        if need <= garbage_bytes {
            return plan;
        }

        let mut freed = 0u64;
        let mut evictable: Vec<&Root> = roots.iter().filter(|r| r.evict.is_some()).collect();
        evictable.sort_by(|a, b| (a.last_pulled, &a.label).cmp(&(b.last_pulled, &b.label)));
        let mut ignore = HashSet::new();
        for r in evictable {
            if garbage_bytes + freed >= need {
                break;
            }
            if held(&view.blobs[r.manifest as usize].key.digest()) {
                continue;
            }
            for &b in scratch.of(view, r, &mut ignore) {
                let c = &mut count[b as usize];
                *c -= 1;
                if *c == 0 {
                    freed += view.blobs[b as usize].size;
                    plan.candidates.push(b);
                }
            }
            let e = r.evict.clone().expect("filtered on evict");
            plan.evictions.push((e, r.label.clone()));
        }
        plan.unmet = need.saturating_sub(garbage_bytes + freed);
        plan
    }
}

/// Every root of `view`: tags, kept images, recent manifests.
fn roots(view: &View, recent: &dyn Fn(u64) -> bool) -> Vec<Root> {
    let pinned_tags: HashSet<(u32, &str)> = view
        .kept
        .iter()
        .filter(|k| k.pinned)
        .filter_map(|k| match &k.reference {
            KeptRef::Tag(t) => Some((k.repo, t.as_str())),
            _ => None,
        })
        .collect();
    let last_pulled = |m: BlobId, fallback: u64| {
        let b = &view.blobs[m as usize];
        if b.access > 0 { b.access } else { fallback }
    };
    let mut roots = Vec::new();
    for t in &view.tags {
        let repo = &view.repos[t.repo as usize];
        let pinned = pinned_tags.contains(&(t.repo, t.tag.as_str()));
        roots.push(Root {
            repo: t.repo,
            manifest: t.manifest,
            evict: (!pinned).then(|| Eviction::Tag {
                repo: repo.clone(),
                tag: t.tag.clone(),
                digest: view.blobs[t.manifest as usize].key.digest(),
            }),
            label: format!("{repo}:{}", t.tag),
            last_pulled: last_pulled(t.manifest, t.updated),
        });
    }
    for k in &view.kept {
        let KeptRef::Digest(m) = k.reference else {
            continue;
        };
        let Some(info) = view.manifests.get(&(k.repo, m)) else {
            continue;
        };
        let repo = &view.repos[k.repo as usize];
        let digest = view.blobs[m as usize].key.digest();
        roots.push(Root {
            repo: k.repo,
            manifest: m,
            evict: (!k.pinned).then(|| Eviction::Kept {
                repo: repo.clone(),
                reference: digest.to_string(),
            }),
            label: format!("{repo}@{digest}"),
            last_pulled: last_pulled(m, info.created),
        });
    }
    // Manifests no tag or kept image names yet, used or written within the grace period: a push
    // in progress (children before their index), an image pulled by digest a moment ago.
    let named: HashSet<(u32, BlobId)> = roots.iter().map(|r| (r.repo, r.manifest)).collect();
    for (&(repo, m), info) in &view.manifests {
        if !named.contains(&(repo, m)) && recent(info.created.max(view.blobs[m as usize].access)) {
            roots.push(Root {
                repo,
                manifest: m,
                evict: None,
                label: String::new(),
                last_pulled: 0,
            });
        }
    }
    roots
}

/// A walk from one root, reusing its buffers.
#[derive(Debug, Default)]
struct Reach {
    seen: HashSet<(u32, BlobId)>,
    blobs: Vec<BlobId>,
    blob_seen: HashSet<BlobId>,
    stack: Vec<(u32, BlobId)>,
}

impl Reach {
    /// The blobs `root` reaches, each once; every manifest reached is added to `manifests`.
    fn of(
        &mut self,
        view: &View,
        root: &Root,
        manifests: &mut HashSet<(u32, BlobId)>,
    ) -> &[BlobId] {
        self.seen.clear();
        self.blobs.clear();
        self.blob_seen.clear();
        self.stack.clear();
        self.stack.push((root.repo, root.manifest));
        while let Some((repo, m)) = self.stack.pop() {
            if !self.seen.insert((repo, m)) {
                continue;
            }
            if view.manifests.contains_key(&(repo, m)) {
                manifests.insert((repo, m));
            }
            if self.blob_seen.insert(m) {
                self.blobs.push(m);
            }
            for &r in view.refs.get(&m).into_iter().flatten() {
                if view.manifests.contains_key(&(repo, r)) {
                    self.stack.push((repo, r));
                } else if self.blob_seen.insert(r) {
                    self.blobs.push(r);
                }
            }
            for &r in view.referrers.get(&(repo, m)).into_iter().flatten() {
                self.stack.push((repo, r));
            }
        }
        &self.blobs
    }
}

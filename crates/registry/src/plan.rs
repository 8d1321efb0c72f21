//! How a manifest of a cached repository is answered, decided from what the store holds and
//! the clock: pure, so that it is read (and tested) as a table.
//!
//! - By digest: from the store if it is there, else fetched. A digest never changes what it
//!   names, so it is never re-validated.
//! - By tag: from the store while the tag is younger than the TTL; once older, re-validated
//!   with a HEAD upstream (and served from the store, as stale, if the upstream cannot answer);
//!   fetched when the store does not know the tag or lacks what it points at.

use std::time::Duration;

use kache_oci::Reference;
use kache_store::TagRecord;

/// How fresh what the upstream said must be, and how long a client waits to learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// A cached tag (and a kept tag or referrers list) older than this is asked again.
    pub tag_ttl: Duration,
    /// The longest a client holding a cached answer waits for the upstream's new one; past
    /// it, the cached answer is served as stale and the upstream's goes into the cache when
    /// it comes. An upstream behind a black hole (dropped packets, a resolver that never
    /// answers) then costs a client this long, not the upstream timeout: the node proxy gives
    /// up on the registry after its own timeout (5 s by default), and must not see a cache
    /// that holds the image as a failing one.
    pub revalidate_wait: Duration,
}

impl Freshness {
    /// The default wait for a re-validation: well under the node proxy's wait for the
    /// registry, well over a healthy upstream's answer to a HEAD.
    pub const REVALIDATE_WAIT: Duration = Duration::from_secs(2);

    /// Tags re-validated once older than `tag_ttl`, waited for [`Self::REVALIDATE_WAIT`].
    pub fn tags(tag_ttl: Duration) -> Self {
        Freshness {
            tag_ttl,
            revalidate_wait: Self::REVALIDATE_WAIT,
        }
    }
}

/// What to do for one manifest read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestPlan {
    /// Answer with what the store holds.
    Serve,
    /// Ask the upstream whether the tag still points there (a HEAD); answer with the store's
    /// copy if it does, or if the upstream cannot say.
    Revalidate,
    /// Fetch it from the upstream.
    Fetch,
}

/// The plan for `reference`, given the store's record of the tag (for a tag), whether the
/// store holds the manifest the reference names, the time (unix seconds) and the tag TTL.
pub fn manifest_plan(
    reference: &Reference,
    tag: Option<&TagRecord>,
    cached: bool,
    now: u64,
    ttl: Duration,
) -> ManifestPlan {
    match (reference, tag, cached) {
        (_, _, false) => ManifestPlan::Fetch,
        (Reference::Digest(_), _, true) => ManifestPlan::Serve,
        (Reference::Tag(_), None, true) => ManifestPlan::Fetch,
        (Reference::Tag(_), Some(rec), true) => {
            if now.saturating_sub(rec.updated) < ttl.as_secs() {
                ManifestPlan::Serve
            } else {
                ManifestPlan::Revalidate
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_oci::Digest;

    #[test]
    fn the_plan_for_each_state_of_the_store_and_the_clock() {
        let d = Digest::sha256(b"m");
        let by_digest = Reference::Digest(d.clone());
        let by_tag: Reference = "v1".parse().unwrap();
        let rec = |updated| TagRecord {
            digest: d.clone(),
            updated,
        };
        let ttl = Duration::from_secs(300);
        let now = 10_000;
        use ManifestPlan::*;
        let table: &[(&Reference, Option<TagRecord>, bool, ManifestPlan)] = &[
            // (reference, tag record, store holds the manifest) -> plan
            (&by_digest, None, true, Serve),
            (&by_digest, None, false, Fetch),
            // An old tag record says nothing about a digest.
            (&by_digest, Some(rec(0)), true, Serve),
            (&by_tag, None, false, Fetch),
            (&by_tag, Some(rec(now)), true, Serve),
            (&by_tag, Some(rec(now - 299)), true, Serve),
            (&by_tag, Some(rec(now - 300)), true, Revalidate),
            (&by_tag, Some(rec(0)), true, Revalidate),
            // A record from the future (a clock set back) is fresh, not an overflow.
            (&by_tag, Some(rec(now + 50)), true, Serve),
            // The tag is known but its manifest went (collected, deleted): fetch again.
            (&by_tag, Some(rec(now)), false, Fetch),
            // A manifest without a tag record (pushed by digest): the tag is fetched.
            (&by_tag, None, true, Fetch),
        ];
        for (reference, tag, cached, want) in table {
            assert_eq!(
                manifest_plan(reference, tag.as_ref(), *cached, now, ttl),
                *want,
                "{reference} {tag:?} {cached}"
            );
        }
        // A zero TTL re-validates every read of a tag.
        assert_eq!(
            manifest_plan(&by_tag, Some(&rec(now)), true, now, Duration::ZERO),
            Revalidate
        );
    }
}

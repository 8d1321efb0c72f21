//! What the registry asks of a store, as one interface: the content layer's reads and pulls,
//! the push API's writes, collection and the limits it keeps, and the admin routes' kept images
//! and verification. [`Store`] (blob files and a redb index) is its first implementation; a
//! second backend (an object store) implements the same trait and runs the same suite
//! (`kache_store::suite`, which the store's own tests run against [`Store`]).
//!
//! The rules every implementation keeps are the crate's (see the crate documentation): a blob
//! is visible only once it is complete and verified, the index never names what is not in
//! place, reads are scoped to the repositories that hold a blob, and collection runs online.
//! Opening, and repairing what a crash left, belong to each backend's constructor.
//!
//! The methods return boxed futures so that the registry holds one `Arc<dyn Storage>`: a box
//! per call is nothing beside the I/O behind it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::future::{BoxFuture, FutureExt};
use kache_oci::{Digest, ParsedManifest, Reference, RepoName};
use kache_wire::{Grant, Visibility};
use uuid::Uuid;

use crate::{
    BlobFile, FetchFailure, FlightStream, GcOptions, GcReport, KeptImage, Limits, Manifest,
    Observer, Pressure, Referrer, Result, Sharing, SourceFn, Store, TagRecord, UploadStatus,
    VerifyProgress, VerifyReport, blocking,
};

/// An error a request body broke off with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way into the store (a push, a chunk).
pub type Body = Pin<Box<dyn Stream<Item = std::result::Result<Bytes, BodyError>> + Send>>;

/// Called after each blob a verification read, on the thread that reads them.
pub type Progress = Box<dyn FnMut(&VerifyProgress) + Send>;

/// A content store, as the registry uses one.
pub trait Storage: Send + Sync + std::fmt::Debug {
    // Blobs, scoped to the repositories that hold them.

    /// The size of `digest` if `repo` may serve it.
    fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>>;
    /// An open file of `digest`, if `repo` may serve it (a backend that keeps blobs elsewhere
    /// serves them from a local copy: warm reads go out with sendfile).
    fn open_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobFile>>;
    /// Stores a whole blob, verified against `expected` before anyone sees it.
    fn put_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        expected: &'a Digest,
        body: Body,
    ) -> BoxFuture<'a, Result<u64>>;
    /// Links a blob of `from` (of any repository, without it) into `repo`; `None` when there is
    /// nothing to link.
    fn mount_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
        from: Option<&'a RepoName>,
    ) -> BoxFuture<'a, Result<Option<u64>>>;
    /// Unlinks `digest` from `repo`; collection removes what nothing references.
    fn delete_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<()>>;
    /// Streams `digest` for `repo`, fetched from `source` unless a fetch of it already runs that
    /// `repo` may join (`sharing`): one fetch per blob however many may share it, each byte
    /// verified before the last reaches anyone.
    fn fetch_blob(
        self: Arc<Self>,
        repo: RepoName,
        digest: Digest,
        sharing: Sharing,
        source: SourceFn,
    ) -> BoxFuture<'static, std::result::Result<FlightStream, FetchFailure>>;

    // Manifests, tags, referrers.

    /// Stores a pushed manifest: every blob it names must be linked in `repo` already.
    fn put_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
        bytes: Bytes,
        parsed: &'a ParsedManifest,
    ) -> BoxFuture<'a, Result<Digest>>;
    /// Stores a manifest fetched from an origin: its blobs come later, on demand.
    fn put_pulled_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
        bytes: Bytes,
        parsed: &'a ParsedManifest,
    ) -> BoxFuture<'a, Result<Digest>>;
    fn get_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<Manifest>>;
    fn delete_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<()>>;
    /// What `tag` of `repo` points at, and when that was last confirmed.
    fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>>;
    /// Records that the origin confirmed `tag` now.
    fn touch_tag<'a>(&'a self, repo: &'a RepoName, tag: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Up to `n` tags of `repo` after `last`, in order.
    fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>>;
    /// Up to `n` repositories after `last`, in order.
    fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>>;
    /// The manifests of `repo` whose subject is `subject`.
    fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Referrer>>;

    // Upload sessions.

    fn start_upload<'a>(&'a self, repo: &'a RepoName) -> BoxFuture<'a, Result<UploadStatus>>;
    fn upload_status<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
    ) -> BoxFuture<'a, Result<UploadStatus>>;
    /// Appends a chunk; `start` (from `Content-Range`) must be the current offset.
    fn append_upload<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
        start: Option<u64>,
        body: Body,
    ) -> BoxFuture<'a, Result<UploadStatus>>;
    /// Completes an upload with an optional last chunk, verified against `digest`.
    fn complete_upload<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
        start: Option<u64>,
        digest: &'a Digest,
        body: Body,
    ) -> BoxFuture<'a, Result<u64>>;
    fn cancel_upload<'a>(&'a self, repo: &'a RepoName, id: &'a Uuid) -> BoxFuture<'a, Result<()>>;
    /// Removes sessions untouched for `max_age`; how many.
    fn expire_uploads(&self, max_age: Duration) -> BoxFuture<'_, Result<usize>>;

    // Space and collection.

    /// Bytes the store holds.
    fn total_bytes(&self) -> u64;
    /// Free bytes where the store writes.
    fn free_bytes(&self) -> Result<u64>;
    /// Refuses a write of `len` bytes that would break the limits.
    fn check_room(&self, len: u64) -> Result<()>;
    /// What the limits need freed now, if anything.
    fn pressure(&self) -> Result<Option<Pressure>>;
    fn set_limits(&self, limits: Limits);
    /// Runs one collection now, online; [`crate::StoreError::Busy`] if one runs already.
    fn collect(self: Arc<Self>, opts: GcOptions) -> BoxFuture<'static, Result<GcReport>>;
    /// Replaces the images the cluster keeps (roots of every collection).
    fn set_kept<'a>(&'a self, images: &'a [KeptImage]) -> BoxFuture<'a, Result<usize>>;
    fn kept(&self) -> Result<Vec<KeptImage>>;
    /// Writes what is held only in memory (access times, which decide what expires).
    fn flush_access(&self) -> BoxFuture<'_, Result<usize>>;
    /// When `digest` was last served, unix seconds, as far as written.
    fn last_access(&self, digest: &Digest) -> Result<Option<u64>>;
    /// Who hears about blobs served but not kept, and about pressure (set once).
    fn set_observer(&self, observer: Arc<dyn Observer>);

    /// Re-reads every blob against its digest.
    fn verify_with(&self, progress: Progress) -> BoxFuture<'_, Result<VerifyReport>>;

    // Who may read a cached repository.

    /// What the upstream showed `repo` to be; `None` before it was asked (and for a repository
    /// of kache's own).
    fn visibility(&self, repo: &RepoName) -> Result<Option<Visibility>>;
    /// Records what `repo` is. Made private, what it holds is scoped to it: a mount that names
    /// no source no longer links its blobs elsewhere.
    fn set_visibility<'a>(
        &'a self,
        repo: &'a RepoName,
        visibility: Visibility,
    ) -> BoxFuture<'a, Result<()>>;
    /// The grant of `namespace` on `repo`, expired or not.
    fn grant(&self, repo: &RepoName, namespace: &str) -> Result<Option<Grant>>;
    /// Writes a grant (replacing the namespace's previous one); once it returns, a crash does
    /// not lose it.
    fn put_grant<'a>(&'a self, repo: &'a RepoName, grant: &'a Grant) -> BoxFuture<'a, Result<()>>;
    /// Removes a grant; whether there was one.
    fn remove_grant<'a>(
        &'a self,
        repo: &'a RepoName,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Every grant, by repository then namespace.
    fn grants(&self) -> Result<Vec<Grant>>;
}

impl Storage for Store {
    fn visibility(&self, repo: &RepoName) -> Result<Option<Visibility>> {
        self.index.visibility(repo)
    }

    fn set_visibility<'a>(
        &'a self,
        repo: &'a RepoName,
        visibility: Visibility,
    ) -> BoxFuture<'a, Result<()>> {
        let (index, repo) = (self.index.clone(), repo.clone());
        blocking(move || index.set_visibility(&repo, visibility)).boxed()
    }

    fn grant(&self, repo: &RepoName, namespace: &str) -> Result<Option<Grant>> {
        self.index.grant(repo, namespace)
    }

    fn put_grant<'a>(&'a self, repo: &'a RepoName, grant: &'a Grant) -> BoxFuture<'a, Result<()>> {
        let (index, repo, grant) = (self.index.clone(), repo.clone(), grant.clone());
        blocking(move || index.put_grant(&repo, &grant)).boxed()
    }

    fn remove_grant<'a>(
        &'a self,
        repo: &'a RepoName,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        let (index, repo, ns) = (self.index.clone(), repo.clone(), namespace.to_owned());
        blocking(move || index.remove_grant(&repo, &ns)).boxed()
    }

    fn grants(&self) -> Result<Vec<Grant>> {
        self.index.grants()
    }

    fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        Store::stat_blob(self, repo, digest)
    }

    fn open_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobFile>> {
        Store::open_blob(self, repo, digest).boxed()
    }

    fn put_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        expected: &'a Digest,
        body: Body,
    ) -> BoxFuture<'a, Result<u64>> {
        Store::put_blob(self, repo, expected, body).boxed()
    }

    fn mount_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
        from: Option<&'a RepoName>,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        Store::mount_blob(self, repo, digest, from).boxed()
    }

    fn delete_blob<'a>(
        &'a self,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<()>> {
        Store::delete_blob(self, repo, digest).boxed()
    }

    fn fetch_blob(
        self: Arc<Self>,
        repo: RepoName,
        digest: Digest,
        sharing: Sharing,
        source: SourceFn,
    ) -> BoxFuture<'static, std::result::Result<FlightStream, FetchFailure>> {
        async move { Store::fetch_blob_shared(&self, &repo, &digest, sharing, move || source()).await }
            .boxed()
    }

    fn put_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
        bytes: Bytes,
        parsed: &'a ParsedManifest,
    ) -> BoxFuture<'a, Result<Digest>> {
        Store::put_manifest(self, repo, reference, bytes, parsed).boxed()
    }

    fn put_pulled_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
        bytes: Bytes,
        parsed: &'a ParsedManifest,
    ) -> BoxFuture<'a, Result<Digest>> {
        Store::put_pulled_manifest(self, repo, reference, bytes, parsed).boxed()
    }

    fn get_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<Manifest>> {
        Store::get_manifest(self, repo, reference).boxed()
    }

    fn delete_manifest<'a>(
        &'a self,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<()>> {
        Store::delete_manifest(self, repo, reference).boxed()
    }

    fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>> {
        Store::tag(self, repo, tag)
    }

    fn touch_tag<'a>(&'a self, repo: &'a RepoName, tag: &'a str) -> BoxFuture<'a, Result<()>> {
        Store::touch_tag(self, repo, tag).boxed()
    }

    fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        Store::list_tags(self, repo, last, n)
    }

    fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        Store::repositories(self, last, n)
    }

    fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Referrer>> {
        Store::referrers(self, repo, subject)
    }

    fn start_upload<'a>(&'a self, repo: &'a RepoName) -> BoxFuture<'a, Result<UploadStatus>> {
        Store::start_upload(self, repo).boxed()
    }

    fn upload_status<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
    ) -> BoxFuture<'a, Result<UploadStatus>> {
        Store::upload_status(self, repo, id).boxed()
    }

    fn append_upload<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
        start: Option<u64>,
        body: Body,
    ) -> BoxFuture<'a, Result<UploadStatus>> {
        Store::append_upload(self, repo, id, start, body).boxed()
    }

    fn complete_upload<'a>(
        &'a self,
        repo: &'a RepoName,
        id: &'a Uuid,
        start: Option<u64>,
        digest: &'a Digest,
        body: Body,
    ) -> BoxFuture<'a, Result<u64>> {
        Store::complete_upload(self, repo, id, start, digest, body).boxed()
    }

    fn cancel_upload<'a>(&'a self, repo: &'a RepoName, id: &'a Uuid) -> BoxFuture<'a, Result<()>> {
        Store::cancel_upload(self, repo, id).boxed()
    }

    fn expire_uploads(&self, max_age: Duration) -> BoxFuture<'_, Result<usize>> {
        Store::expire_uploads(self, max_age).boxed()
    }

    fn total_bytes(&self) -> u64 {
        Store::total_bytes(self)
    }

    fn free_bytes(&self) -> Result<u64> {
        Store::free_bytes(self)
    }

    fn check_room(&self, len: u64) -> Result<()> {
        Store::check_room(self, len)
    }

    fn pressure(&self) -> Result<Option<Pressure>> {
        Store::pressure(self)
    }

    fn set_limits(&self, limits: Limits) {
        Store::set_limits(self, limits)
    }

    fn collect(self: Arc<Self>, opts: GcOptions) -> BoxFuture<'static, Result<GcReport>> {
        async move { Store::collect(&self, opts).await }.boxed()
    }

    fn set_kept<'a>(&'a self, images: &'a [KeptImage]) -> BoxFuture<'a, Result<usize>> {
        Store::set_kept(self, images).boxed()
    }

    fn kept(&self) -> Result<Vec<KeptImage>> {
        Store::kept(self)
    }

    fn flush_access(&self) -> BoxFuture<'_, Result<usize>> {
        Store::flush_access(self).boxed()
    }

    fn last_access(&self, digest: &Digest) -> Result<Option<u64>> {
        Store::last_access(self, digest)
    }

    fn set_observer(&self, observer: Arc<dyn Observer>) {
        Store::set_observer(self, observer)
    }

    fn verify_with(&self, progress: Progress) -> BoxFuture<'_, Result<VerifyReport>> {
        Store::verify_with(self, progress).boxed()
    }
}

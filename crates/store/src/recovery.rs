//! What [`Store::open`](crate::Store::open) repairs after an unclean stop.

use kache_oci::Digest;

use crate::error::Result;
use crate::fs::Layout;
use crate::index::Index;
use crate::upload;

/// What [`Store::open`](crate::Store::open) found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub temp_files_removed: usize,
    pub missing_blobs_forgotten: usize,
    pub orphan_blobs_adopted: usize,
    pub stale_uploads_removed: usize,
}

/// Brings the files under `layout` and `index` back in step; what it did, and the bytes the
/// blob files hold.
pub(crate) fn recover(layout: &Layout, index: &Index) -> Result<(Recovery, u64)> {
    let mut rec = Recovery::default();

    // Temporary files are writes that never completed.
    for e in std::fs::read_dir(layout.tmp())? {
        std::fs::remove_file(e?.path())?;
        rec.temp_files_removed += 1;
    }

    // Index entries whose file is gone are forgotten; a file at a final path that the
    // index does not know was verified before its rename, so it is adopted (unlinked:
    // GC decides its fate).
    let mut missing = Vec::new();
    let mut total = 0u64;
    index.for_each_blob(|d, r| match std::fs::metadata(layout.blob(&d)) {
        Ok(m) if m.len() == r.size => total += r.size,
        _ => missing.push(d),
    })?;
    rec.missing_blobs_forgotten = missing.len();
    index.forget_blobs(&missing)?;
    let mut orphans = Vec::new();
    for_each_blob_file(layout, |d, size| {
        if index.blob(&d)?.is_none() {
            orphans.push((d, size));
        }
        Ok(())
    })?;
    index.adopt_blobs(&orphans)?;
    total += orphans.iter().map(|(_, size)| size).sum::<u64>();
    rec.orphan_blobs_adopted = orphans.len();

    rec.stale_uploads_removed = upload::recover(layout, index)?;
    if rec != Recovery::default() {
        tracing::warn!(?rec, "store repaired after an unclean stop");
    }
    Ok((rec, total))
}

/// Calls `f` with every `blobs/<alg>/<xx>/<hex>` file whose name is a valid digest, and its size.
pub(crate) fn for_each_blob_file(
    layout: &Layout,
    mut f: impl FnMut(Digest, u64) -> Result<()>,
) -> Result<()> {
    for alg in std::fs::read_dir(layout.blobs())? {
        let alg = alg?;
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for shard in std::fs::read_dir(alg.path())? {
            for file in std::fs::read_dir(shard?.path())? {
                let file = file?;
                let name = format!("{alg_name}:{}", file.file_name().to_string_lossy());
                match name.parse::<Digest>() {
                    Ok(d) if file.path() == layout.blob(&d) => f(d, file.metadata()?.len())?,
                    _ => {
                        tracing::warn!(path = %file.path().display(), "ignoring a file that is not a blob")
                    }
                }
            }
        }
    }
    Ok(())
}

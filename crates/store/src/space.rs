//! Room on the disk: the size cap and the free-space floor the store is asked to keep, what the
//! filesystem says is free, and the bytes that fetches in progress have claimed but not written.
//!
//! A fetch announces its size before a byte arrives; it only writes if that many bytes are free
//! beyond every other fetch's claim, so two large blobs never both start on room for one. A
//! write that cannot fit is refused (a push) or served without being kept (a pull-through).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// How much of the disk the store may use: eviction frees whole images beyond these.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Bytes of blobs the store holds at most (`--max-size`).
    pub max_size: Option<u64>,
    /// Free space kept on the data directory's filesystem (`--min-free`).
    pub min_free: MinFree,
}

/// The free-space floor: a share of the filesystem or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MinFree {
    /// Percent of the filesystem's size, 0 to 100.
    Percent(f64),
    Bytes(u64),
}

impl Default for MinFree {
    fn default() -> Self {
        MinFree::Percent(5.0)
    }
}

/// Why a size or share does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpaceError(String);

/// Parses a size: a number of bytes with an optional unit, decimal (`kB`, `MB`, `GB`, `TB`) or
/// binary (`KiB`, `MiB`, `GiB`, `TiB`, or Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`). `1.5GiB` is
/// allowed; the result is rounded down to a byte.
pub fn parse_size(s: &str) -> Result<u64, SpaceError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| SpaceError(format!("{s:?} is not a size (like 200GiB or 500MB)")))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        u => {
            return Err(SpaceError(format!(
                "{s:?}: unknown unit {u:?} (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )));
        }
    };
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(SpaceError(format!("{s:?} is too large")));
    }
    Ok(bytes as u64)
}

impl std::str::FromStr for MinFree {
    type Err = SpaceError;

    /// `5%` or a size (`10GiB`).
    fn from_str(s: &str) -> Result<Self, SpaceError> {
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| SpaceError(format!("{s:?} is not a percentage")))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(SpaceError(format!("{s:?} is not between 0% and 100%")));
                }
                Ok(MinFree::Percent(p))
            }
            None => parse_size(s).map(MinFree::Bytes),
        }
    }
}

/// The filesystem under the data directory, as `statvfs` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Disk {
    /// Bytes an unprivileged writer may still use.
    pub available: u64,
    /// The filesystem's size.
    pub size: u64,
}

#[derive(Debug)]
pub(crate) struct Space {
    root: PathBuf,
    limits: Mutex<Limits>,
    /// Bytes announced by fetches in progress and not yet written.
    claimed: AtomicU64,
}

/// A fetch's claim on free space; given back as it is written or when it ends.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    space: &'a Space,
    left: u64,
}

impl Claim<'_> {
    /// `n` more bytes are on disk: they no longer count as claimed.
    pub(crate) fn written(&mut self, n: u64) {
        let n = n.min(self.left);
        self.left -= n;
        self.space.claimed.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.space.claimed.fetch_sub(self.left, Ordering::Relaxed);
    }
}

impl Space {
    pub(crate) fn new(root: &Path) -> Self {
        Space {
            root: root.to_owned(),
            limits: Mutex::new(Limits::default()),
            claimed: AtomicU64::new(0),
        }
    }

    pub(crate) fn limits(&self) -> Limits {
        *self.limits.lock().expect("limits poisoned")
    }

    pub(crate) fn set_limits(&self, limits: Limits) {
        *self.limits.lock().expect("limits poisoned") = limits;
    }

    pub(crate) fn disk(&self) -> std::io::Result<Disk> {
        let st = rustix::fs::statvfs(&self.root)?;
        Ok(Disk {
            available: st.f_bavail.saturating_mul(st.f_frsize),
            size: st.f_blocks.saturating_mul(st.f_frsize),
        })
    }

    /// The floor in bytes on a filesystem of `size` bytes.
    pub(crate) fn min_free_bytes(&self, size: u64) -> u64 {
        match self.limits().min_free {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (size as f64 * p / 100.0) as u64,
        }
    }

    /// Claims room for `size` bytes, or says why there is none. `Ok(low)` tells whether the
    /// write takes the disk under its free-space floor (eviction should run).
    pub(crate) fn claim(&self, size: u64) -> Result<(Claim<'_>, bool), String> {
        let disk = self
            .disk()
            .map_err(|e| format!("cannot read free space: {e}"))?;
        // Claimed first, then checked: two fetches racing each count the other.
        let before = self.claimed.fetch_add(size, Ordering::Relaxed);
        let claim = Claim {
            space: self,
            left: size,
        };
        let room = disk.available.saturating_sub(before);
        if size > room {
            return Err(format!(
                "{size} bytes do not fit in the {room} bytes free (of {} on the disk, {before} claimed by fetches in progress)",
                disk.available
            ));
        }
        let low = room - size < self.min_free_bytes(disk.size);
        Ok((claim, low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("200GiB"), Ok(200 << 30));
        assert_eq!(parse_size("200Gi"), Ok(200 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("42"), Ok(42));
        assert_eq!(parse_size(" 7 MiB "), Ok(7 << 20));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("-1GB").is_err());
    }

    #[test]
    fn floors() {
        assert_eq!("5%".parse::<MinFree>(), Ok(MinFree::Percent(5.0)));
        assert_eq!("10GiB".parse::<MinFree>(), Ok(MinFree::Bytes(10 << 30)));
        assert!("120%".parse::<MinFree>().is_err());
        assert!("x%".parse::<MinFree>().is_err());
    }

    #[test]
    fn claims_count_against_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path());
        let free = space.disk().unwrap().available;
        let (first, _) = space.claim(free / 2 + 1).unwrap();
        assert!(space.claim(free / 2 + 1).is_err(), "the first claim counts");
        drop(first);
        assert!(space.claim(free / 2 + 1).is_ok(), "given back when dropped");
        assert!(space.claim(u64::MAX / 2).is_err());
    }
}

//! The rules every byte taken from an upstream is held to, whoever takes it (the registry
//! storing it, or a node proxy relaying it while the registry is down): a manifest is read
//! whole up to [`MAX_MANIFEST_SIZE`], must hash to the digest it was asked by and to the
//! `Docker-Content-Digest` the upstream announced, and must be a manifest kache knows; a blob
//! must hash to its digest, and its last byte is held back until it does.

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use kache_oci::{Digest, MAX_MANIFEST_SIZE, ParsedManifest, Reference};

use crate::error::UpstreamError;
use crate::response::UpstreamResponse;

/// A manifest from an upstream that passed every rule.
#[derive(Debug, Clone)]
pub struct CheckedManifest {
    /// The digest of its bytes.
    pub digest: Digest,
    pub bytes: Bytes,
    pub parsed: ParsedManifest,
}

impl UpstreamResponse {
    /// The manifest this answer holds, once it passed every rule for `reference` (the tag or
    /// digest it was asked by); [`UpstreamError::Invalid`] says which it broke.
    pub async fn checked_manifest(
        self,
        reference: &Reference,
    ) -> Result<CheckedManifest, UpstreamError> {
        let announced = self.digest();
        let content_type = self.content_type().map(str::to_owned);
        let bytes = match self.bytes_limited(MAX_MANIFEST_SIZE).await {
            Err(UpstreamError::TooLarge(limit)) => {
                return Err(UpstreamError::Invalid(format!(
                    "the manifest is larger than {limit} bytes"
                )));
            }
            r => r?,
        };
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => announced.as_ref(),
        };
        let algorithm = expected.map_or(kache_oci::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::compute(algorithm, &bytes);
        if let Some(want) = expected
            && *want != digest
        {
            return Err(UpstreamError::Invalid(format!(
                "the manifest hashes to {digest}, not to {want}"
            )));
        }
        if let (Reference::Digest(_), Some(a)) = (reference, &announced)
            && *a != digest
        {
            return Err(UpstreamError::Invalid(format!(
                "the manifest's Docker-Content-Digest is {a}, but it hashes to {digest}"
            )));
        }
        let parsed = ParsedManifest::parse(&bytes, content_type.as_deref())
            .map_err(|e| UpstreamError::Invalid(format!("the manifest: {e}")))?;
        Ok(CheckedManifest {
            digest,
            bytes,
            parsed,
        })
    }

    /// The body of a blob asked by `digest`, streamed, with its last chunk held back until
    /// the whole body hashed to `digest` (and came to the announced length): a client never
    /// holds all of a blob that does not verify. A body that does not ends with
    /// [`UpstreamError::Invalid`] in its last chunk's place.
    pub fn into_verified_stream(
        self,
        digest: &Digest,
    ) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        verified(self.content_length(), digest.clone(), self.into_stream())
    }
}

/// `body`, its last chunk held back until it hashed to `digest` and came to `length` bytes.
pub(crate) fn verified<S>(
    length: Option<u64>,
    digest: Digest,
    body: S,
) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static,
{
    struct State<S> {
        body: std::pin::Pin<Box<S>>,
        hasher: Option<kache_oci::Hasher>,
        held: Option<Bytes>,
        seen: u64,
        length: Option<u64>,
        digest: Digest,
    }
    let state = State {
        body: Box::pin(body),
        hasher: Some(digest.algorithm().hasher()),
        held: None,
        seen: 0,
        length,
        digest,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        let hasher = st.hasher.as_mut()?;
        loop {
            match st.body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    st.seen += chunk.len() as u64;
                    if st.length.is_some_and(|l| st.seen > l) {
                        st.hasher = None;
                        let l = st.length.unwrap_or_default();
                        return Some((
                            Err(UpstreamError::Invalid(format!(
                                "the blob is longer than the {l} bytes announced"
                            ))),
                            st,
                        ));
                    }
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.hasher = None;
                    return Some((Err(e), st));
                }
                None => {
                    let actual = st.hasher.take()?.finish();
                    let verdict = if let Some(l) = st.length.filter(|l| *l != st.seen) {
                        Err(UpstreamError::Invalid(format!(
                            "the blob ended after {} of the {l} bytes announced",
                            st.seen
                        )))
                    } else if actual != st.digest {
                        Err(UpstreamError::Invalid(format!(
                            "the blob hashes to {actual}, not to {}",
                            st.digest
                        )))
                    } else {
                        Ok(st.held.take().unwrap_or_default())
                    };
                    return Some((verdict, st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt as _;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + use<> {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    async fn run(
        length: Option<u64>,
        digest: &Digest,
        parts: &[&'static [u8]],
    ) -> (Vec<Bytes>, Option<UpstreamError>) {
        let mut s = Box::pin(verified(length, digest.clone(), chunks(parts)));
        let mut got = Vec::new();
        loop {
            match s.next().await {
                Some(Ok(b)) => got.push(b),
                Some(Err(e)) => return (got, Some(e)),
                None => return (got, None),
            }
        }
    }

    #[tokio::test]
    async fn a_blob_that_verifies_comes_whole() {
        let d = Digest::sha256(b"hello world");
        let (got, err) = run(Some(11), &d, &[b"hello", b" ", b"world"]).await;
        assert!(err.is_none());
        assert_eq!(got.concat(), b"hello world");
        let (got, err) = run(None, &d, &[b"hello world"]).await;
        assert!(err.is_none());
        assert_eq!(got.concat(), b"hello world");
        let empty = Digest::sha256(b"");
        let (got, err) = run(Some(0), &empty, &[]).await;
        assert!(err.is_none());
        assert_eq!(got.concat(), b"");
    }

    #[tokio::test]
    async fn a_blob_that_does_not_verify_never_arrives_whole() {
        let d = Digest::sha256(b"hello world");
        for (length, parts, says) in [
            (Some(11), &[&b"hello"[..], b" ", b"wurld"][..], "hashes to"),
            (None, &[&b"hello worl"[..]][..], "hashes to"),
            (
                Some(11),
                &[&b"hello"[..], b" wor"][..],
                "ended after 9 of the 11",
            ),
            (
                Some(5),
                &[&b"hello"[..], b" world"][..],
                "longer than the 5",
            ),
        ] {
            let (got, err) = run(length, &d, parts).await;
            let err = err.expect("an error");
            assert!(err.to_string().contains(says), "{err}");
            let sent: usize = got.iter().map(Bytes::len).sum();
            let total: usize = parts.iter().map(|p| p.len()).sum();
            assert!(sent < total, "the whole body went out: {got:?}");
        }
        // Nothing follows the error.
        let mut s = Box::pin(verified(None, d.clone(), chunks(&[b"nope"])));
        assert!(s.next().await.unwrap().is_err());
        assert!(s.next().await.is_none());
        let collected: Result<Vec<Bytes>, _> =
            Box::pin(verified(None, d, chunks(&[b"hello world"])))
                .try_collect()
                .await;
        assert!(collected.is_ok());
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;

use super::*;

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn data(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
}

#[derive(Debug)]
struct Refusal;
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream said 404")
    }
}
impl std::error::Error for Refusal {}

/// A source sending `bytes` in 10 KiB chunks with a pause between them, announcing `size`.
fn dripping(
    bytes: Bytes,
    size: Option<u64>,
    calls: Arc<AtomicUsize>,
) -> impl Fn() -> futures_util::future::BoxFuture<'static, Result<Source, FetchError>>
+ Send
+ Sync
+ 'static {
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        let bytes = bytes.clone();
        Box::pin(async move {
            let chunks: Vec<Bytes> = bytes
                .chunks(10 * 1024)
                .map(Bytes::copy_from_slice)
                .collect();
            let body = futures_util::stream::iter(chunks).then(|c| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, FetchError>(c)
            });
            Ok(Source {
                size,
                body: Box::pin(body),
            })
        })
    }
}

/// A reader of `file` driven by `rx` by hand, whose source (if the store gives up) is `source`.
fn reader(
    file: std::fs::File,
    rx: watch::Receiver<State>,
    digest: &Digest,
    source: SourceFn,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let flight = Flight {
        key: (digest.clone(), None),
        tmp: PathBuf::new(),
        source,
        state: watch::channel(State::Starting).0,
        repos: Mutex::new(Vec::new()),
    };
    Reader::new(Arc::new(file), rx, &flight, digest).stream()
}

fn never_called() -> SourceFn {
    Arc::new(|| Box::pin(async { panic!("the source is not asked again") }))
}

async fn collect(s: FlightStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = s.body;
    while let Some(c) = body.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// Waits until the fetch of `d`, if one still runs, has committed or failed: readers may finish
/// before the blob is renamed into place and indexed.
async fn settled(store: &Store, d: &Digest) {
    let rx = store
        .flights
        .map
        .lock()
        .unwrap()
        .get(&(d.clone(), None))
        .map(|f| f.state.subscribe());
    if let Some(mut rx) = rx {
        let _ = rx
            .wait_for(|s| matches!(s, State::Done { .. } | State::Broken(_)))
            .await;
    }
}

fn open(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(Store::open(dir).unwrap().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_make_one_fetch_and_all_get_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(300 * 1024);
    let d = Digest::sha256(&bytes);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, d, bytes, calls) = (store.clone(), d.clone(), bytes.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let r = repo(&format!("r{}", i % 2));
            let s = store
                .fetch_blob(
                    &r,
                    &d,
                    dripping(bytes.clone(), Some(bytes.len() as u64), calls),
                )
                .await
                .unwrap();
            collect(s).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), bytes);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Served (from the verified temporary file) before the commit as after it.
    for r in ["r0", "r1"] {
        assert_eq!(
            store.stat_blob(&repo(r), &d).unwrap(),
            Some(bytes.len() as u64)
        );
    }
    settled(&store, &d).await;
    for r in ["r0", "r1"] {
        assert_eq!(
            store.stat_blob(&repo(r), &d).unwrap(),
            Some(bytes.len() as u64),
            "{r} may serve it"
        );
    }
    assert_eq!(std::fs::read(store.blob_path(&d)).unwrap(), bytes);
}

#[tokio::test]
async fn the_fetch_completes_when_its_first_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(200 * 1024);
    let d = Digest::sha256(&bytes);
    let calls = Arc::new(AtomicUsize::new(0));
    let first = store
        .fetch_blob(
            &repo("r"),
            &d,
            dripping(bytes.clone(), Some(bytes.len() as u64), calls.clone()),
        )
        .await
        .unwrap();
    let second = store
        .fetch_blob(&repo("r"), &d, dripping(bytes.clone(), None, calls.clone()))
        .await
        .unwrap();
    drop(first);
    assert_eq!(collect(second).await.unwrap(), bytes);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    settled(&store, &d).await;
    assert_eq!(store.verify().await.unwrap().blobs, 1);
    assert_eq!(store.verify().await.unwrap().bad, Vec::<String>::new());
}

#[tokio::test]
async fn wrong_bytes_never_complete_a_response_and_are_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(100 * 1024);
    let claimed = Digest::sha256(b"what the client asked for");
    let calls = Arc::new(AtomicUsize::new(0));
    let s = store
        .fetch_blob(
            &repo("r"),
            &claimed,
            dripping(bytes.clone(), Some(bytes.len() as u64), calls),
        )
        .await
        .unwrap();
    let mut got = 0usize;
    let mut body = s.body;
    let mut failed = false;
    while let Some(c) = body.next().await {
        match c {
            Ok(c) => got += c.len(),
            Err(e) => {
                assert!(e.to_string().contains("hashing to"), "{e}");
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the stream must end in an error");
    assert!(got < bytes.len(), "the whole (wrong) blob was delivered");
    assert_eq!(store.stat_blob(&repo("r"), &claimed).unwrap(), None);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(store.total_bytes(), 0);
}

#[tokio::test]
async fn a_truncated_source_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(50 * 1024);
    let d = Digest::sha256(&bytes);
    let calls = Arc::new(AtomicUsize::new(0));
    // Announces the full size, sends half.
    let s = store
        .fetch_blob(
            &repo("r"),
            &d,
            dripping(bytes.slice(..25 * 1024), Some(bytes.len() as u64), calls),
        )
        .await
        .unwrap();
    assert!(collect(s).await.is_err());
    assert_eq!(store.stat_blob(&repo("r"), &d).unwrap(), None);
}

#[tokio::test]
async fn a_refusal_reaches_every_joiner_as_the_source_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = Digest::sha256(b"absent");
    let err = store
        .fetch_blob(&repo("r"), &d, || async {
            Err::<Source, FetchError>(Arc::new(Refusal))
        })
        .await
        .unwrap_err();
    match err {
        FetchFailure::Source(e) => assert!(e.downcast_ref::<Refusal>().is_some()),
        FetchFailure::Store(e) => panic!("{e}"),
    }
    // A later request tries again rather than inheriting the failure.
    let bytes = Bytes::from_static(b"absent");
    let calls = Arc::new(AtomicUsize::new(0));
    let s = store
        .fetch_blob(&repo("r"), &d, dripping(bytes.clone(), None, calls))
        .await
        .unwrap();
    assert_eq!(collect(s).await.unwrap(), bytes);
}

/// A follower of a blob whose bytes are all on disk: everything but the last byte while the
/// flight runs, the rest once it reports `verified` (the end of the stream), or an error.
async fn follow_to_the_last_byte(verified: bool) -> (Vec<u8>, std::io::Result<()>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blob");
    let bytes = data(300 * 1024);
    std::fs::write(&p, &bytes).unwrap();
    let len = bytes.len() as u64;
    let (tx, rx) = watch::channel(State::Running {
        size: Some(len),
        written: len,
    });
    let d = Digest::sha256(&bytes);
    let s = reader(std::fs::File::open(&p).unwrap(), rx, &d, never_called());
    let mut s = std::pin::pin!(s);
    let mut got = Vec::new();
    while got.len() < bytes.len() - 1 {
        got.extend_from_slice(&s.next().await.unwrap().unwrap());
    }
    assert_eq!(got, bytes[..bytes.len() - 1]);
    assert!(
        s.next().now_or_never().is_none(),
        "the last byte waits for the digest"
    );
    tx.send_replace(if verified {
        State::Verified { size: len }
    } else {
        State::Broken("source sent bytes hashing to something else".into())
    });
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => return (got, Err(e)),
        }
    }
    (got, Ok(()))
}

#[tokio::test]
async fn followers_finish_once_the_digest_matches_before_the_blob_is_committed() {
    let (got, end) = follow_to_the_last_byte(true).await;
    end.unwrap();
    assert_eq!(got, data(300 * 1024));
}

#[tokio::test]
async fn followers_of_a_failed_digest_never_get_the_last_byte() {
    let (got, end) = follow_to_the_last_byte(false).await;
    assert!(end.unwrap_err().to_string().contains("hashing to"));
    assert_eq!(got.len(), 300 * 1024 - 1);
}

#[tokio::test]
async fn empty_chunks_from_the_source_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(600 * 1024);
    let d = Digest::sha256(&bytes);
    let chunks: Vec<Bytes> = bytes
        .chunks(100 * 1024)
        .flat_map(|c| [Bytes::new(), Bytes::copy_from_slice(c)])
        .collect();
    let s = store
        .fetch_blob(&repo("r"), &d, move || {
            let chunks = chunks.clone();
            async move {
                let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, FetchError>));
                Ok(Source {
                    size: None,
                    body: Box::pin(body),
                })
            }
        })
        .await
        .unwrap();
    assert_eq!(collect(s).await.unwrap(), bytes);
}

/// A reader part-way through a blob the store gives up on goes on from the source: `source_bytes`
/// are what the source sends when asked again.
async fn switch_to_the_source(source_bytes: Bytes) -> (Vec<u8>, std::io::Result<()>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blob");
    let bytes = data(300 * 1024);
    let d = Digest::sha256(&bytes);
    std::fs::write(&p, &bytes[..100 * 1024]).unwrap();
    let (tx, rx) = watch::channel(State::Running {
        size: Some(bytes.len() as u64),
        written: 100 * 1024,
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let source = dripping(source_bytes, None, calls.clone());
    let s = reader(
        std::fs::File::open(&p).unwrap(),
        rx,
        &d,
        Arc::new(move || source()),
    );
    let mut s = std::pin::pin!(s);
    let mut got = Vec::new();
    while got.len() < 100 * 1024 - 1 {
        got.extend_from_slice(&s.next().await.unwrap().unwrap());
    }
    tx.send_replace(State::Unstored);
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => return (got, Err(e)),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    (got, Ok(()))
}

#[tokio::test]
async fn a_reader_the_store_gives_up_on_gets_the_rest_from_the_source() {
    let (got, end) = switch_to_the_source(data(300 * 1024)).await;
    end.unwrap();
    assert_eq!(got, data(300 * 1024));
}

#[tokio::test]
async fn the_whole_a_switched_reader_sends_is_what_gets_verified() {
    // What the reader already sent came from the file: the source's first bytes are skipped,
    // so a difference there changes nothing the reader sends.
    let mut early = data(300 * 1024).to_vec();
    early[10] ^= 0xFF;
    let (got, end) = switch_to_the_source(Bytes::from(early)).await;
    end.unwrap();
    assert_eq!(got, data(300 * 1024));
    // A difference in what the source sends next: no last byte, an error.
    let mut late = data(300 * 1024).to_vec();
    late[200 * 1024] ^= 0xFF;
    let (got, end) = switch_to_the_source(Bytes::from(late)).await;
    assert!(end.unwrap_err().to_string().contains("hashing to"));
    assert!(got.len() < 300 * 1024);
}

/// What a server sending the flight's file itself may send: all but the last byte written
/// while the flight runs, all of it once verified, nothing more once the store gives up or
/// the fetch fails.
#[tokio::test]
async fn follow_answers_what_may_be_sent_as_the_flight_goes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blob");
    std::fs::write(&p, data(1000)).unwrap();
    let (tx, rx) = watch::channel(State::Starting);
    let follow = Follow {
        file: Arc::new(std::fs::File::open(&p).unwrap()),
        rx,
    };
    let waiting = tokio::spawn({
        let follow = follow.clone();
        async move { follow.ready(0).await }
    });
    tx.send_replace(State::Running {
        size: Some(1000),
        written: 1,
    });
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "one byte written: the last one, held back"
    );
    tx.send_replace(State::Running {
        size: Some(1000),
        written: 600,
    });
    assert_eq!(waiting.await.unwrap().unwrap(), Some(599));
    assert!(
        follow.ready(599).now_or_never().is_none(),
        "past what was written, it waits"
    );
    tx.send_replace(State::Verified { size: 1000 });
    assert_eq!(follow.ready(599).await.unwrap(), Some(1000));
    tx.send_replace(State::Done {
        size: 1000,
        stored: true,
    });
    assert_eq!(follow.ready(0).await.unwrap(), Some(1000));

    tx.send_replace(State::Unstored);
    assert_eq!(
        follow.ready(599).await.unwrap(),
        None,
        "the body takes over"
    );
    tx.send_replace(State::Broken("source sent 600 of 1000 bytes".into()));
    let e = follow.ready(599).await.unwrap_err();
    assert!(e.to_string().contains("600 of 1000"), "{e}");
    drop(tx);
    let (tx, rx) = watch::channel(State::Starting);
    drop(tx);
    let orphan = Follow { rx, ..follow };
    assert!(
        orphan.ready(0).await.is_err(),
        "a fetch that ended without a result"
    );
}

//! kache's server over real sockets on 127.0.0.1: sendfile bodies, and connections handed to
//! hyper.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kache_http::{Bodies, SendFile, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bytes of the test file: no two neighbouring 251-byte runs alike.
fn content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    file: Arc<std::fs::File>,
    data: Vec<u8>,
}

fn fixture(len: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let data = content(len);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let file = Arc::new(std::fs::File::open(&path).unwrap());
    Fixture {
        _dir: dir,
        file,
        data,
    }
}

/// `GET /file?start&len` answers with a SendFile of those bytes and a body of `filler`
/// instead: whichever the client gets shows which one was sent.
fn file_app(file: Arc<std::fs::File>, filler: u8) -> Router {
    Router::new()
        .route(
            "/file/{start}/{len}",
            get(
                move |axum::extract::Path((start, len)): axum::extract::Path<(u64, u64)>| {
                    let file = file.clone();
                    async move {
                        let mut resp = Body::from(vec![filler; len as usize]).into_response();
                        resp.extensions_mut()
                            .insert(SendFile::new(file, start, len));
                        resp
                    }
                },
            ),
        )
        .route("/", get(|| async { "root" }))
}

async fn spawn(server: Server) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(server.serve(l, std::future::pending()));
    addr
}

/// Reads one response (head and a `content-length` body) from `tcp`; `None` for the body
/// when the connection ended before all of it.
async fn read_response(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, Option<Vec<u8>>) {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut slots);
        if let httparse::Status::Complete(used) = resp.parse(buf).unwrap() {
            let status = resp.code.unwrap();
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap_or(0);
            buf.drain(..used);
            while buf.len() < len {
                let mut chunk = vec![0u8; 64 * 1024];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return (status, None),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf.drain(..len).collect();
            return (status, Some(body));
        }
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a whole response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_sendfile_answer_sends_the_file_over_keep_alive() {
    let f = fixture(3 * 1024 * 1024 + 17);
    let addr = spawn(Server::new(file_app(f.file.clone(), b'x'))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let total = f.data.len();
    // The whole file, a range inside it, and the last byte, on one connection.
    for (start, len) in [(0, total), (1_000_001, 1_500_000), (total - 1, 1)] {
        let req = format!("GET /file/{start}/{len} HTTP/1.1\r\nhost: x\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut tcp, &mut buf).await;
        assert_eq!(status, 200);
        let body = body.expect("a whole body");
        assert!(body == f.data[start..start + len], "bytes {start}+{len}");
    }
    // A HEAD sends no body at all: the next answer starts right after the head.
    tcp.write_all(b"HEAD /file/0/10 HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head_buf = Vec::new();
    loop {
        let mut chunk = vec![0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap();
        head_buf.extend_from_slice(&chunk[..n]);
        if head_buf.ends_with(b"root") {
            break;
        }
    }
    let text = String::from_utf8(head_buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 10\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(!text.contains("xxxxxxxxxx"), "a HEAD sent a body: {text}");
}

#[tokio::test]
async fn a_file_shorter_than_promised_ends_the_connection_short() {
    let f = fixture(100_000);
    let addr = spawn(Server::new(file_app(f.file.clone(), b'x'))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /file/50000/60000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut tcp, &mut buf).await;
    assert_eq!(status, 200);
    // 50,000 bytes were there to send; the 60,000 promised never complete.
    assert_eq!(body, None);
    assert_eq!(&buf[..], &f.data[50_000..]);
}

#[tokio::test]
async fn http2_streams_the_body_instead() {
    let f = fixture(200_000);
    let addr = spawn(Server::new(file_app(f.file.clone(), b'x'))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/file/0/1000"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &[b'x'; 1000][..]);
}

/// Records the bodies of PUTs.
fn push_app(seen: Arc<Mutex<Vec<Vec<u8>>>>) -> Router {
    Router::new()
        .route(
            "/put",
            axum::routing::put(
                |State(seen): State<Arc<Mutex<Vec<Vec<u8>>>>>, body: Bytes| async move {
                    seen.lock().unwrap().push(body.to_vec());
                    (StatusCode::CREATED, "stored")
                },
            ),
        )
        .route("/", get(|| async { "root" }))
        .with_state(seen)
}

#[tokio::test]
async fn a_request_body_hands_the_connection_to_hyper_that_request_first() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = spawn(Server::new(push_app(seen.clone())).bodies(Bodies::Hyper)).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut tcp, &mut buf).await,
        (200, Some(b"root".to_vec()))
    );
    // A chunked push, then a pull, pipelined: hyper answers both, in order.
    tcp.write_all(
        b"PUT /put HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
          GET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(
        read_response(&mut tcp, &mut buf).await,
        (201, Some(b"stored".to_vec()))
    );
    assert_eq!(
        read_response(&mut tcp, &mut buf).await,
        (200, Some(b"root".to_vec()))
    );
    let body = b"x".repeat(300_000);
    let put = format!(
        "PUT /put HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(put.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    assert_eq!(
        read_response(&mut tcp, &mut buf).await,
        (201, Some(b"stored".to_vec()))
    );
    assert_eq!(*seen.lock().unwrap(), vec![b"hello world".to_vec(), body]);
}

#[tokio::test]
async fn without_hyper_a_request_body_is_not_read_and_the_connection_closes() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = spawn(Server::new(push_app(seen.clone()))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PUT /put HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    // The router answers with the body it got: none.
    assert!(text.starts_with("HTTP/1.1 201 Created\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert_eq!(*seen.lock().unwrap(), vec![Vec::<u8>::new()]);
}

/// Reads until the server closes; how long that took (paused time: jumps ahead whenever
/// everything waits, so the server's timeouts pass at once and exactly).
async fn closed_after(tcp: &mut TcpStream) -> std::time::Duration {
    let start = tokio::time::Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(600),
        tcp.read_to_end(&mut sink),
    )
    .await
    .expect("closed within 10 minutes")
    .unwrap();
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_completes_is_closed_after_30_s() {
    let addr = spawn(Server::new(push_app(Default::default()))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let waited = closed_after(&mut tcp).await;
    assert!(waited.as_secs() == 30, "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_after_90_s() {
    let addr = spawn(Server::new(push_app(Default::default()))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut tcp, &mut buf).await,
        (200, Some(b"root".to_vec()))
    );
    let waited = closed_after(&mut tcp).await;
    assert!(waited.as_secs() == 90, "{waited:?}");
}

/// A file written in steps while it is served: `grow` appends the next step and says how far
/// the file is; `Growth` follows it, and gives up at `give_up` when asked to.
struct Growing {
    _dir: tempfile::TempDir,
    file: Arc<std::fs::File>,
    writer: std::fs::File,
    data: Vec<u8>,
    written: tokio::sync::watch::Sender<u64>,
}

impl Growing {
    fn new(len: usize) -> Growing {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("growing");
        let writer = std::fs::File::create(&path).unwrap();
        Growing {
            file: Arc::new(std::fs::File::open(&path).unwrap()),
            _dir: dir,
            writer,
            data: content(len),
            written: tokio::sync::watch::channel(0).0,
        }
    }

    fn grow(&mut self, to: usize) {
        let from = *self.written.borrow() as usize;
        self.writer.write_all(&self.data[from..to]).unwrap();
        self.written.send_replace(to as u64);
    }

    /// Follows the file as `grow` extends it, up to `give_up` at most; asked for more than
    /// that, it gives up (`None`).
    fn growth(&self, give_up: Option<u64>) -> kache_http::Growth {
        let written = self.written.clone();
        Arc::new(move |sent| {
            let mut rx = written.subscribe();
            Box::pin(async move {
                if give_up.is_some_and(|g| sent >= g) {
                    return Ok(None);
                }
                loop {
                    let now = (*rx.borrow_and_update()).min(give_up.unwrap_or(u64::MAX));
                    if now > sent {
                        return Ok(Some(now));
                    }
                    rx.changed().await.map_err(std::io::Error::other)?;
                }
            })
        })
    }
}

/// `GET /` answers the growing file: a SendFile that follows it, and a body that is the file's
/// bytes from `real_from` on and filler before: a client that gets the file's bytes whole got
/// them from the file up to there.
fn growing_app(g: &Growing, give_up: Option<u64>, real_from: usize) -> Router {
    let mut data = g.data.clone();
    data[..real_from].fill(b'#');
    let (file, growth) = (g.file.clone(), g.growth(give_up));
    Router::new().route(
        "/",
        get(move || {
            let (file, data, growth) = (file.clone(), data.clone(), growth.clone());
            async move {
                let len = data.len() as u64;
                let mut resp = Body::from(data).into_response();
                resp.extensions_mut()
                    .insert(SendFile::new(file, 0, len).growing(growth));
                resp
            }
        }),
    )
}

#[tokio::test]
async fn a_growing_file_is_sent_as_it_grows_and_whole() {
    let len = 3 * 1024 * 1024 + 77;
    let mut g = Growing::new(len);
    let addr = spawn(Server::new(growing_app(&g, None, len))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        let mut buf = Vec::new();
        let answer = read_response(&mut tcp, &mut buf).await;
        (answer, tcp)
    });
    // Steps written while the server sends: however they interleave, the client gets every
    // byte once, in order.
    for step in [1, 64 * 1024, 1024 * 1024, 2 * 1024 * 1024 + 5, len] {
        g.grow(step);
        tokio::task::yield_now().await;
    }
    let ((status, body), mut tcp) = reading.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.as_deref() == Some(&g.data[..]),
        "the whole file, in order"
    );
    // The connection stays usable.
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut tcp, &mut buf).await;
    assert_eq!(status, 200);
    assert_eq!(body.map(|b| b.len()), Some(len));
}

#[tokio::test]
async fn a_file_that_stops_growing_is_finished_from_the_body() {
    let len = 2 * 1024 * 1024 + 11;
    let give_up = 1024 * 1024 + 3;
    let mut g = Growing::new(len);
    g.grow(len);
    // The growth lets the file go up to `give_up`, then gives up: the rest can only come from
    // the body.
    let addr = spawn(Server::new(growing_app(&g, Some(give_up as u64), give_up))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut tcp, &mut buf).await;
    assert_eq!(status, 200);
    assert!(
        body.as_deref() == Some(&g.data[..]),
        "the file's bytes, then the body's from where the file stopped"
    );
}

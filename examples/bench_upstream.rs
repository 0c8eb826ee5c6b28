//! The application behind the proxy in `scripts/bench.sh`: a minimal HTTP/1.1 server that
//! answers every request with the same small body, so the benchmark measures the proxy
//! and not the application.
//!
//! Paths under `/write` also answer with `X-Session-Update`: a ~100-byte session whose
//! counter changes on every response, so each request is a real store write.
//!
//! `cargo run --release --example bench_upstream -- 127.0.0.1:3000`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"Hello from the benchmark upstream. This body never changes.\n";

fn answer(req: &Request<Incoming>, writes: &AtomicU64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if req.uri().path().starts_with("/write") {
        let n = writes.fetch_add(1, Ordering::Relaxed);
        let session = format!(
            r#"{{"user_id":"u-1234567","roles":["reader","editor"],"cart":[17,42,99],"theme":"dark","n":{n}}}"#
        );
        if let Ok(value) = HeaderValue::try_from(STANDARD.encode(session)) {
            headers.insert("x-session-update", value);
        }
    }
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    println!("bench upstream listening on {}", listener.local_addr()?);
    let writes = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let writes = writes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &writes);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

//! The one HTTP server of acpimon, behind both the service's metrics/status endpoint and the
//! reference controller, so both treat slow or hostile clients alike: request headers within
//! [`HEADER_TIMEOUT`] and [`MAX_HEADER_BYTES`] (else 408/431 or a closed connection), the
//! whole connection within [`CONNECTION_TIMEOUT`] (a client trickling its body cannot hold a
//! task forever); request bodies are bounded by each handler. HTTP/1.1 only, over plain TCP or
//! TLS ([`serve_tls`]: the handshake, too, within [`HEADER_TIMEOUT`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// A client must have sent its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, whatever it is doing. Our clients open one connection
/// per request.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head (request line and headers) read.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// A response with a complete body.
pub type Reply = Response<Full<Bytes>>;

/// Serves `handler` on `listener` until `shutdown` turns true (or its sender is gone); then
/// stops accepting, drops open connections and returns. `name` says whose server it is in
/// messages.
pub async fn serve<H, F>(listener: TcpListener, name: &str, handler: H, shutdown: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, Infallible>> + Send + 'static,
{
    serve_tls(listener, name, handler, shutdown, None).await
}

/// [`serve`], with each connection's TLS handshake first when `tls` is given. A client that
/// fails the handshake (a wrong or expired certificate, plain HTTP on a TLS port, nothing sent)
/// is logged at debug level and dropped; other connections go on.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    name: &str,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<TlsAcceptor>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, Infallible>> + Send + 'static,
{
    let addr = listener.local_addr().map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = super::until_true(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    let tls = tls.clone();
                    let server = name.to_string();
                    conns.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let Some(tls) = tls else { return connection(stream, handler).await };
                        match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                            Ok(Ok(stream)) => connection(stream, handler).await,
                            Ok(Err(e)) => tracing::debug!(server, %peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(server, %peer, "no TLS handshake in time"),
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(server = name, %addr, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// One HTTP/1.1 connection, bounded as the module says.
async fn connection<S, H, F>(stream: S, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, Infallible>> + Send + 'static,
{
    let service = hyper::service::service_fn(handler);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[tokio::test]
    async fn serves_bounds_request_heads_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let handler = |_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hi"))))
        };
        let server = tokio::spawn(serve(listener, "test server", handler, rx));
        let ok = exchange(addr, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("hi"), "{ok}");
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2 * MAX_HEADER_BYTES));
        big.extend_from_slice(b"\r\n\r\n");
        let refused = exchange(addr, &big).await;
        assert!(refused.is_empty() || refused.starts_with("HTTP/1.1 431"), "{refused}");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), server).await.expect("stops promptly").unwrap();
    }
}

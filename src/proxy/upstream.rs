//! Connections to the app (inbound) and to original destinations (outbound).
//!
//! HTTP goes through hyper-util's pooled client: keep-alive connections per upstream address, and a
//! request that was queued on a pooled connection the app had just closed (the keep-alive race
//! Envoy users meet as "503 upstream connect error") is retried once on a fresh connection, because
//! it was never written. Every socket the proxy opens can carry a mark (`--proxy-mark`) so that the
//! pod's redirect rules let it pass, whatever user the proxy runs as.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use super::body::RequestBody;

/// Idle pooled connections are closed after this long. Shorter than most apps' own keep-alive
/// would mean churn; the retry above covers the apps that close first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE_PER_HOST: usize = 1024;

#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    pub timeout: Duration,
    /// SO_MARK for upstream sockets; `None` when disabled or not permitted.
    pub mark: Option<u32>,
}

/// Opens a TCP connection with Nagle off and the proxy's mark, bounded by the connect timeout.
pub async fn connect(addr: SocketAddr, opts: ConnectOptions) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(mark) = opts.mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    match tokio::time::timeout(opts.timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} took longer than {:?}", opts.timeout),
        )),
    }
}

/// Whether this process may set SO_MARK (it needs CAP_NET_ADMIN). Checked once at startup so that
/// an unprivileged proxy (excluded from redirection by its uid instead) does not fail every connect.
pub fn mark_if_permitted(mark: u32) -> Option<u32> {
    if mark == 0 {
        return None;
    }
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    match probe.set_mark(mark) {
        Ok(()) => Some(mark),
        Err(e) => {
            tracing::info!(
                "not marking upstream sockets ({e}): the redirect rules must exclude the proxy by its uid/gid"
            );
            None
        }
    }
}

/// hyper-util connector: the URIs are ours, always `http://IP:PORT`.
#[derive(Clone, Copy, Debug)]
pub struct Connector(pub ConnectOptions);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let opts = self.0;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("not an IP:PORT upstream: {uri}"),
                    )
                })?;
            connect(addr, opts).await.map(TokioIo::new)
        })
    }
}

pub type HttpClient = Client<Connector, RequestBody>;

/// The pooled clients, one per HTTP version spoken to upstreams.
pub struct Upstream {
    pub http1: HttpClient,
    pub http2: HttpClient,
}

impl Upstream {
    pub fn new(opts: ConnectOptions, preserve_header_case: bool) -> Upstream {
        let build = |http2_only: bool| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
                .retry_canceled_requests(true)
                // The proxy sets Host itself: the client's by default, the app's with --rewrite-host.
                .set_host(false)
                .http1_preserve_header_case(preserve_header_case)
                .http2_only(http2_only)
                .build(Connector(opts))
        };
        Upstream {
            http1: build(false),
            http2: build(true),
        }
    }
}

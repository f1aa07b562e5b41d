//! Views of a running proxy for a person, read from its admin listener's live stream of records
//! (`GET /tap`, served to loopback only: run them in the pod, `kubectl exec POD -c amazing-proxy
//! -- amazing-proxy top`): [`tap`] prints each exchange, [`top`] shows the traffic by route or
//! peer, live, from the numbers [`stats`] keeps.

pub mod stats;
pub mod tap;
pub mod top;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "cannot reach the admin listener at {admin}: {reason} (is the proxy running? --admin names another address)"
    )]
    Connect { admin: SocketAddr, reason: String },
    #[error("the proxy refused /tap ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the stream from {admin} broke: {reason}")]
    Stream { admin: SocketAddr, reason: String },
    #[error("cannot start: {0}")]
    Runtime(std::io::Error),
    #[error("the terminal: {0}")]
    Terminal(std::io::Error),
}

/// The lines of `/tap` (each a record, or a `{"dropped":N}` notice).
pub(crate) struct Lines {
    admin: SocketAddr,
    body: Incoming,
    pending: BytesMut,
}

impl Lines {
    /// Opens `GET /tap?query` on the admin listener at `admin`.
    pub(crate) async fn open(admin: SocketAddr, query: &str) -> Result<Lines, ViewError> {
        let connect_failed = |reason: String| ViewError::Connect { admin, reason };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(admin))
            .await
            .map_err(|_| connect_failed(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_failed(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| connect_failed(e.to_string()))?;
        tokio::spawn(conn);
        let broke = |reason: String| ViewError::Stream { admin, reason };
        let request = http::Request::get(format!("/tap?{query}"))
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| broke(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| broke(e.to_string()))?;
        let status = response.status();
        let body = response.into_body();
        if status != http::StatusCode::OK {
            let message = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(ViewError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(Lines {
            admin,
            body,
            pending: BytesMut::new(),
        })
    }

    /// The next line, without its newline.
    pub(crate) async fn next(&mut self) -> Result<String, ViewError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line = self.pending.split_to(end + 1);
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            let admin = self.admin;
            let broke = |reason: String| ViewError::Stream { admin, reason };
            let Some(frame) = self.body.frame().await else {
                return Err(broke("the proxy ended the stream (it is stopping?)".into()));
            };
            let frame = frame.map_err(|e| broke(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }
}

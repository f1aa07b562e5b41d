//! A SPIFFE Workload API server for tests: gRPC over a Unix socket, `SpiffeWorkloadAPI.FetchX509SVID`
//! streaming, the `workload.spiffe.io: true` header required as SPIRE's agent requires it.
//!
//! No codegen: the messages are workload.proto's, written as prost structs; the service is routed
//! by hand onto `tonic::server::Grpc`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

pub type Updates = mpsc::Sender<Result<X509SvidResponse, Status>>;

/// `FetchX509SVID`: refuses a call without the security header (as SPIRE does); otherwise hands
/// the test a sender for the call's response stream, which ends when the test drops it.
#[derive(Clone)]
struct Fetch(mpsc::UnboundedSender<Updates>);

impl tonic::server::ServerStreamingService<X509SvidRequest> for Fetch {
    type Response = X509SvidResponse;
    type ResponseStream = ReceiverStream<Result<X509SvidResponse, Status>>;
    type Future = Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<X509SvidRequest>) -> Self::Future {
        let header = req.metadata().get("workload.spiffe.io");
        if header.and_then(|v| v.to_str().ok()) != Some("true") {
            return ready(Err(Status::invalid_argument(
                "security header missing from request",
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let _ = self.0.send(tx);
        ready(Ok(Response::new(ReceiverStream::new(rx))))
    }
}

async fn route(
    fetch: Fetch,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
        X509SvidResponse,
        X509SvidRequest,
    >::default());
    Ok(match req.uri().path() {
        "/SpiffeWorkloadAPI/FetchX509SVID" => grpc.server_streaming(fetch, req).await,
        _ => Status::unimplemented("not in this test's Workload API").into_http(),
    })
}

/// The Workload API server on `socket`, aborted when dropped, and each call's response stream.
pub struct Agent(tokio::task::JoinHandle<()>);

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn start_agent(socket: &Path) -> (Agent, mpsc::UnboundedReceiver<Updates>) {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind the agent socket");
    let (calls_tx, calls) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let fetch = Fetch(calls_tx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| route(fetch.clone(), req));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (Agent(task), calls)
}

/// A response with one SVID (DER chain, PKCS#8 key) and its trust bundle (DER).
pub fn svid_response(id: &str, chain: &[u8], key: &[u8], bundle: &[u8]) -> X509SvidResponse {
    X509SvidResponse {
        svids: vec![X509Svid {
            spiffe_id: id.to_owned(),
            x509_svid: chain.to_vec(),
            x509_svid_key: key.to_vec(),
            bundle: bundle.to_vec(),
            hint: String::new(),
        }],
        ..X509SvidResponse::default()
    }
}

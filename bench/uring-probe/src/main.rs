//! The same HTTP/1.1 forwarder twice, on tokio (epoll) and on monoio (io_uring): each client
//! connection keeps one upstream connection; a request head (no body) is forwarded as it came, the
//! response (Content-Length framed) is read whole and written back. One thread each. Measures
//! what the I/O model alone changes on the fast path's loop.
use std::net::SocketAddr;

const CAP: usize = 64 * 1024;

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn response_len(buf: &[u8]) -> Option<usize> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut fields);
    match res.parse(buf).ok()? {
        httparse::Status::Complete(n) => {
            let len = res
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            Some(n + len)
        }
        httparse::Status::Partial => None,
    }
}

mod on_tokio {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind(listen).await.unwrap();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(client, upstream));
            }
        });
    }

    async fn serve(mut client: TcpStream, upstream: SocketAddr) {
        client.set_nodelay(true).unwrap();
        let Ok(mut up) = TcpStream::connect(upstream).await else {
            return;
        };
        up.set_nodelay(true).unwrap();
        let mut req = Vec::with_capacity(CAP);
        let mut resp = Vec::with_capacity(CAP);
        loop {
            let end = loop {
                if let Some(end) = head_end(&req) {
                    break end;
                }
                match client.read_buf(&mut req).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            };
            if up.write_all(&req[..end]).await.is_err() {
                return;
            }
            req.drain(..end);
            let total = loop {
                if let Some(total) = response_len(&resp) {
                    if resp.len() >= total {
                        break total;
                    }
                }
                match up.read_buf(&mut resp).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            };
            if client.write_all(&resp[..total]).await.is_err() {
                return;
            }
            resp.drain(..total);
        }
    }
}

mod on_monoio {
    use super::*;
    use monoio::buf::IoBufMut;
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    use monoio::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind(listen).unwrap();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                monoio::spawn(serve(client, upstream));
            }
        });
    }

    async fn read_more(stream: &mut TcpStream, buf: Vec<u8>) -> (bool, Vec<u8>) {
        let filled = buf.len();
        let (res, slice) = stream.read(buf.slice_mut(filled..)).await;
        let buf = slice.into_inner();
        (matches!(res, Ok(n) if n > 0), buf)
    }

    async fn serve(client: TcpStream, upstream: SocketAddr) {
        let mut client = client;
        client.set_nodelay(true).unwrap();
        let Ok(mut up) = TcpStream::connect(upstream).await else {
            return;
        };
        up.set_nodelay(true).unwrap();
        let mut req = Vec::with_capacity(CAP);
        let mut resp = Vec::with_capacity(CAP);
        let mut out = Vec::with_capacity(CAP);
        loop {
            let end = loop {
                if let Some(end) = head_end(&req) {
                    break end;
                }
                let (ok, buf) = read_more(&mut client, req).await;
                req = buf;
                if !ok {
                    return;
                }
            };
            out.clear();
            out.extend_from_slice(&req[..end]);
            req.drain(..end);
            let (res, buf) = up.write_all(out).await;
            out = buf;
            if res.is_err() {
                return;
            }
            let total = loop {
                if let Some(total) = response_len(&resp) {
                    if resp.len() >= total {
                        break total;
                    }
                }
                let (ok, buf) = read_more(&mut up, resp).await;
                resp = buf;
                if !ok {
                    return;
                }
            };
            out.clear();
            out.extend_from_slice(&resp[..total]);
            resp.drain(..total);
            let (res, buf) = client.write_all(out).await;
            out = buf;
            if res.is_err() {
                return;
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, model, listen, upstream] => listen
            .parse()
            .ok()
            .zip(upstream.parse().ok())
            .map(|a| (model.as_str(), a)),
        _ => None,
    };
    match parsed {
        Some(("tokio", (listen, upstream))) => on_tokio::run(listen, upstream),
        Some(("monoio", (listen, upstream))) => on_monoio::run(listen, upstream),
        _ => {
            eprintln!("usage: uring-probe tokio|monoio LISTEN_IP:PORT UPSTREAM_IP:PORT");
            std::process::exit(2);
        }
    }
}

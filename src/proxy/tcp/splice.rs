//! Zero-copy relay for opaque TCP: splice(2) socket -> pipe -> socket, one pipe per direction,
//! so the payload never enters user space.
//!
//! Why: with a 64 KiB user-space buffer per direction (the fallback in `super`), one iperf3
//! stream through the proxy reached ~0.59 of direct on loopback (bench/protocols.sh, proxy on its
//! own core at ~85% of it; Envoy's tcp_proxy ~0.68) and the proxy was the bottleneck. With splice,
//! nine runs reached 0.72 of direct (median; best 0.86; 15-17 Gbit/s against 11-12.5) and the
//! proxy needs ~8 s of CPU for 15 s of traffic instead of ~12.8 s: the bottleneck moved to the
//! core running the iperf3 client and server (~95% busy, the proxy's core ~60%), which also
//! carries the kernel's share of the second connection. A larger pipe (F_SETPIPE_SZ 256 KiB or
//! 1 MiB) measured no better within the noise, so it is left at the default.
//!
//! Memory: two pipes (four descriptors) per opaque connection, each holding up to the kernel's
//! default 64 KiB (16 pages) while data is in flight. That is kernel memory, charged to the
//! pipes and mostly page references to the sockets' own buffers, not our RSS; the user-space
//! copy held 128 KiB of heap per connection instead.
//!
//! Readiness comes from tokio (`readable()`/`writable()` and `try_io`, so a WouldBlock clears the
//! readiness it stood for); the splices themselves never block (SPLICE_F_NONBLOCK, non-blocking
//! sockets and pipes).

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::idle::IdleClock;
use crate::error::ErrorKind;

/// Upper bound for one splice into the pipe; the pipe's capacity (64 KiB) is the real one.
const SPLICE_MAX: usize = 1 << 20;

/// One pipe: what one direction has taken from its socket and not yet given to the other.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> nix::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

/// The two pipes of one connection.
pub(super) struct Pipes {
    to_server: Pipe,
    to_client: Pipe,
}

impl Pipes {
    pub(super) fn new() -> nix::Result<Pipes> {
        Ok(Pipes {
            to_server: Pipe::new()?,
            to_client: Pipe::new()?,
        })
    }
}

/// Returns (bytes client to server, bytes server to client), kept when either direction fails:
/// client to server counts what was taken from the client, server to client what was given to
/// it, as the user-space copy counts them.
pub(super) async fn both_ways(
    client: &TcpStream,
    server: &TcpStream,
    pipes: &Pipes,
    clock: &IdleClock,
) -> (Result<(), ErrorKind>, u64, u64) {
    let mut sent = 0;
    let mut received = 0;
    let result = tokio::try_join!(
        async { one_way(client, server, &pipes.to_server, &mut sent, true, clock).await },
        async {
            // Server to client: the failing side is the other way round.
            one_way(
                server,
                client,
                &pipes.to_client,
                &mut received,
                false,
                clock,
            )
            .await
            .map_err(|(e, from_failed)| (e, !from_failed))
        },
    );
    // The side that failed is named: a client that resets is the client's fault, not the app's.
    let result = result.map(|_| ()).map_err(|(e, client_failed)| {
        tracing::debug!("opaque connection ended: {e}");
        if client_failed {
            ErrorKind::TcpClientReset
        } else {
            ErrorKind::TcpIo
        }
    });
    (result, sent, received)
}

/// Moves bytes from `from` to `to` until `from` ends (then shuts `to` for writing) or either
/// fails (the error says whether it was `from`). `count_in`: count what is taken from `from`
/// (else what is given to `to`).
///
/// The pipe is always empty when reading from `from`, and never empty when writing to `to`, so a
/// WouldBlock can only come from the socket, and `try_io` is right to clear its readiness.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    count: &mut u64,
    count_in: bool,
    clock: &IdleClock,
) -> Result<(), (io::Error, bool)> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        let mut in_pipe = loop {
            from.readable().await.map_err(|e| (e, true))?;
            match from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, SPLICE_MAX, flags)?)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((e, true)),
            }
        };
        if in_pipe == 0 {
            SockRef::from(to)
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| (e, false))?;
            return Ok(());
        }
        clock.touch();
        if count_in {
            *count += in_pipe as u64;
        }
        while in_pipe > 0 {
            to.writable().await.map_err(|e| (e, false))?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, in_pipe, flags)?)
            }) {
                // Cannot happen with bytes in the pipe; an error rather than a spin if it does.
                Ok(0) => return Err((io::ErrorKind::WriteZero.into(), false)),
                Ok(n) => {
                    in_pipe -= n;
                    if !count_in {
                        *count += n as u64;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((e, false)),
            }
        }
    }
}

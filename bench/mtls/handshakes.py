#!/usr/bin/env python3
"""New mutual-TLS connections per second against one server (bench/mtls.sh's handshake figure).

Each connection: TCP connect, TLS 1.3 handshake with the client certificate and ALPN h2, the HTTP/2
preface and an empty SETTINGS frame, then a read until the server's first HTTP/2 frame arrives (the
proof that the server finished its side of the handshake and checked the certificate), then close.
No resumption: every connection is a full handshake (ECDHE + certificate verify both ways).
Runs as root (it marks its sockets 1337, as the proxy does). Usage: handshakes.py HOST PORT CERT KEY CA SECONDS PROCESSES
Prints: `<connections> <errors> <seconds>`.
"""
import multiprocessing
import socket
import ssl
import sys
import time

SO_MARK = getattr(socket, "SO_MARK", 36)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def loop(host, port, cert, key, ca, seconds, out):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False  # SPIFFE identities are URI SANs; the chain is still verified
    ctx.set_alpn_protocols(["h2"])
    done = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
                # The proxy's mark: `init`'s rules let the connection out unredirected.
                raw.setsockopt(socket.SOL_SOCKET, SO_MARK, 1337)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait for the preface
                raw.settimeout(5)
                raw.connect((host, port))
                with ctx.wrap_socket(raw) as tls:
                    if tls.selected_alpn_protocol() != "h2":
                        raise ssl.SSLError("ALPN h2 not selected")
                    tls.sendall(PREFACE)
                    if not tls.recv(9):
                        raise ConnectionError("closed before its first HTTP/2 frame")
            done += 1
        except (OSError, ssl.SSLError):
            errors += 1
    out.put((done, errors))


def main():
    host, port, cert, key, ca, seconds, procs = sys.argv[1:8]
    out = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=loop, args=(host, int(port), cert, key, ca, float(seconds), out))
        for _ in range(int(procs))
    ]
    start = time.monotonic()
    for w in workers:
        w.start()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    print(sum(r[0] for r in results), sum(r[1] for r in results), round(time.monotonic() - start, 2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Load clients and a racy app for bench/reliability.sh. Each subcommand prints one JSON object.

  slowloris HOST:PORT  N sockets trickle a request head one byte every --every seconds while a
                       normal client makes one request every 100 ms; reports the normal client's
                       statuses and how many slowloris sockets are still open at each checkpoint.
  idle HOST:PORT       N keep-alive clients make one request each and stay open; reports RSS and
                       descriptors of --pid before and after, whether new requests (and --admin
                       /metrics) still answer with them open, and how many are still open after
                       --hold seconds. --h2: each client speaks HTTP/2 (h2c, prior knowledge; the
                       `h2` package, as in the tests' venv).
  race HOST:PORT       R GETs on C keep-alive connections; counts what is not a 200.
  recover HOST:PORT    kills --app-pid, restarts the app (--restart), and measures from the
                       app's port accepting again to the first 200 through the proxy.
  close-app PORT       an HTTP/1.1 app that answers, then closes the connection 1 ms later without
                       saying `Connection: close` (the keep-alive race on every pooled connection).

Every wait is bounded; sockets close when the subcommand ends.
"""
import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def read_response(reader, limit=10.0):
    """Reads one response with a Content-Length or chunked body; returns (status, headers dict)."""
    async def read():
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower().endswith("chunked"):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return status, headers
    return await asyncio.wait_for(read(), limit)


async def one_request(target, path="/", limit=10.0):
    """GET on a new connection: the status, or an error name."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), limit)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        status, _ = await read_response(reader, limit)
        return status
    except Exception as e:  # noqa: BLE001 - any failure is a data point
        return type(e).__name__
    finally:
        if writer:
            writer.close()


def tally(results):
    out = {}
    for r in results:
        out[str(r)] = out.get(str(r), 0) + 1
    return out


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def connections(pids, port_filter):
    """Established connections of `pids` that match an ss port filter such as `dport = :80`."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( {port_filter} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return sum(1 for line in out.splitlines() if any(f"pid={p}," in line for p in pids))


# ---------------------------------------------------------------------------------------------
async def slowloris(args):
    target = addr(args.target)
    open_sockets = set()
    tasks = []
    tried = []

    async def attacker(i):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
        except Exception:  # noqa: BLE001 - refused or timed out: never open
            tried.append(i)
            return
        open_sockets.add(i)
        tried.append(i)
        try:
            writer.write(b"GET /slowloris HTTP/1.1\r\nHost: bench\r\n")
            await writer.drain()
            closed = asyncio.ensure_future(reader.read(1))  # EOF or a 408/503 means closed
            closed.add_done_callback(lambda f: f.cancelled() or f.exception())  # a reset is closed too
            for b in b"X-Slowloris: " + b"a" * 100000:
                done, _ = await asyncio.wait({closed}, timeout=args.every)
                if done:
                    break
                writer.write(bytes([b]))
                await writer.drain()
        except Exception:  # noqa: BLE001 - reset by the proxy
            pass
        finally:
            open_sockets.discard(i)
            writer.close()

    start = time.monotonic()
    for i in range(args.n):
        tasks.append(asyncio.ensure_future(attacker(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    for _ in range(300):  # every attacker has connected or failed (at most 15 s)
        if len(tried) == args.n:
            break
        await asyncio.sleep(0.05)
    opened = len(open_sockets)
    statuses = []

    async def normal():
        while True:
            statuses.append(await one_request(target, "/normal", 5))
            await asyncio.sleep(0.1)

    normal_task = asyncio.ensure_future(normal())
    still_open = {}
    for checkpoint in args.at:
        await asyncio.sleep(max(0, start + checkpoint - time.monotonic()))
        still_open[f"{checkpoint}s"] = len(open_sockets)
    normal_task.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, normal_task, return_exceptions=True)
    return {"attackers": args.n, "opened": opened, "still_open": still_open, "normal": tally(statuses)}


# ---------------------------------------------------------------------------------------------
async def h2_get(target, limit=10.0):
    """An HTTP/2 client (h2c, prior knowledge) that makes one GET and keeps its connection open:
    (reader, writer, status)."""
    import h2.config
    import h2.connection
    import h2.events
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), limit)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                          (":authority", "bench")], end_stream=True)
    writer.write(conn.data_to_send())
    status = None

    async def read():
        nonlocal status
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    writer.write(conn.data_to_send())
                    return
            writer.write(conn.data_to_send())
    await asyncio.wait_for(read(), limit)
    return reader, writer, status


async def idle(args):
    target = addr(args.target)
    pids = [int(p) for p in args.pid.split(",")]
    rss0 = sum(proc_rss_kb(p) for p in pids)
    fds0 = sum(proc_fds(p) for p in pids)
    held, failed = [], []
    gate = asyncio.Semaphore(args.concurrency)

    async def client():
        async with gate:
            try:
                if args.h2:
                    reader, writer, status = await h2_get(target)
                else:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
                    writer.write(REQUEST)
                    status, _ = await read_response(reader)
                held.append((reader, writer))
                if status != 200:
                    failed.append(status)
            except Exception as e:  # noqa: BLE001
                failed.append(type(e).__name__)

    await asyncio.gather(*(client() for _ in range(args.n)))
    idle_since = time.monotonic()
    await asyncio.sleep(2)  # idle long enough for buffers to be released
    rss1 = sum(proc_rss_kb(p) for p in pids)
    fds1 = sum(proc_fds(p) for p in pids)
    # What the proxy still holds (it may have shed some to stay within its descriptors), and its
    # connections to the app (the pool, shared by every client).
    kept = connections(pids, f"sport = :{target[1]}")
    app_conns = connections(pids, f"dport = :{args.app_port}")
    new = [await one_request(target, "/new", 5) for _ in range(20)]
    admin = [await one_request(addr(args.admin), "/metrics", 5) for _ in range(5)] if args.admin else []
    # Still open after --hold seconds of idleness (the proxy's idle timeout should have closed them).
    still_open = None
    if args.hold:
        await asyncio.sleep(max(0, idle_since + args.hold - time.monotonic()))
        still_open = sum(1 for r, _ in held if not r.at_eof() and r.exception() is None)
    for _, w in held:
        w.close()
    return {
        "clients": args.n, "http2": args.h2, "connected": len(held), "first_request_failed": tally(failed),
        "rss_kb_before": rss0, "rss_kb_after": rss1, "fds_before": fds0, "fds_after": fds1,
        "kept_by_proxy": kept, "app_connections": app_conns,
        "bytes_per_idle": round((rss1 - rss0) * 1024 / kept) if kept else None,
        "fds_per_idle": round((fds1 - fds0) / kept, 2) if kept else None,
        "new_requests": tally(new), "admin_metrics": tally(admin),
        "hold_s": args.hold, "still_open_after_hold": still_open,
    }


# ---------------------------------------------------------------------------------------------
async def race(args):
    target = addr(args.target)
    results = []

    async def conn(share):
        reader = writer = None
        for i in range(share):
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
                writer.write(f"GET /race/{i} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                status, headers = await read_response(reader, 10)
                results.append(status)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
            except Exception as e:  # noqa: BLE001 - a lost request
                results.append(type(e).__name__)
                if writer:
                    writer.close()
                writer = None
            # Give the app's 1 ms close a chance to land right as the next request goes out.
            await asyncio.sleep(0.001 * (i % 3))
        if writer:
            writer.close()

    per = args.requests // args.connections
    await asyncio.gather(*(conn(per) for _ in range(args.connections)))
    counts = tally(results)
    return {"requests": len(results), "errors": len(results) - counts.get("200", 0), "statuses": counts}


# ---------------------------------------------------------------------------------------------
async def recover(args):
    target, app = addr(args.target), addr(args.app)
    os.kill(args.app_pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    down = [await one_request(target, "/down", 5) for _ in range(5)]
    await asyncio.sleep(args.down)
    proc = subprocess.Popen(shlex.split(args.restart), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up_at = None
    deadline = time.monotonic() + 20
    while up_at is None and time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection(*app)
            up_at = time.monotonic()
            w.close()
        except OSError:
            await asyncio.sleep(0.001)
    first_200_ms, after = None, []
    while up_at is not None and time.monotonic() < deadline:
        status = await one_request(target, "/recover", 5)
        after.append(status)
        if status == 200:
            first_200_ms = round((time.monotonic() - up_at) * 1000, 1)
            break
        await asyncio.sleep(0.001)
    return {"while_down": tally(down), "before_first_200": len(after) - 1 if after else None,
            "after_restart": tally(after), "first_200_ms": first_200_ms, "app_pid": proc.pid}


# ---------------------------------------------------------------------------------------------
async def close_app(args):
    async def handle(reader, writer):
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n")
                await writer.drain()
                await asyncio.sleep(0.001)
                break  # closes without having said so: the next request on it is lost
        except Exception:  # noqa: BLE001
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd_name", required=True)
    s = sub.add_parser("slowloris")
    s.add_argument("target")
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--every", type=float, default=3.0)
    s.add_argument("--at", type=int, nargs="+", default=[35, 65])
    s = sub.add_parser("idle")
    s.add_argument("target")
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--pid", required=True, help="comma-separated pids whose RSS and fds are summed")
    s.add_argument("--admin", help="HOST:PORT whose /metrics must still answer")
    s.add_argument("--app-port", type=int, required=True, help="the app's port, to count pooled connections")
    s.add_argument("--concurrency", type=int, default=200, help="clients making their first request at once")
    s.add_argument("--hold", type=float, default=0, help="then stay idle this long and count who is still open")
    s.add_argument("--h2", action="store_true", help="HTTP/2 clients (h2c, prior knowledge)")
    s = sub.add_parser("race")
    s.add_argument("target")
    s.add_argument("--requests", type=int, default=5000)
    s.add_argument("--connections", type=int, default=4)
    s = sub.add_parser("recover")
    s.add_argument("target")
    s.add_argument("--app", required=True)
    s.add_argument("--app-pid", type=int, required=True)
    s.add_argument("--down", type=float, default=1.0)
    s.add_argument("--restart", required=True, help="the command that starts the app again")
    s = sub.add_parser("close-app")
    s.add_argument("port", type=int)
    args = p.parse_args()
    run = {"slowloris": slowloris, "idle": idle, "race": race, "recover": recover, "close-app": close_app}
    out = asyncio.run(run[args.cmd_name](args))
    if out is not None:
        print(json.dumps(out))


if __name__ == "__main__":
    main()

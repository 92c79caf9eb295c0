"""bench/router.py: what the router adds, measured against the same upstream hit directly, in one run.

    python bench/router.py [--seconds 5] [--json]

Upstream: a minimal ASGI app under uvicorn that answers /v1/completions with a fixed short completion
(no model: the router's own cost is what is measured) and /health. Added latency: sequential requests,
router minus direct, p50/p99. Throughput: a closed loop of keep-alive connections for a fixed time, the
highest rate over a few concurrency levels. The load generator is a raw asyncio HTTP/1.1 client (httpx
would be the bottleneck), in its own process; upstream and router are separate processes too, all on
this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time

import numpy as np

from beluga.cxlpool.bench import free_port

BODY = json.dumps({"model": "m", "prompt": "Say hi", "max_tokens": 4}).encode()
ANSWER = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m",
                     "choices": [{"index": 0, "text": " hi", "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}).encode()




async def upstream_app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    while (await receive()).get("more_body"):
        pass
    if path == "/v1/models":
        body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
    elif path == "/health":
        body = b"{}"
    else:
        body = ANSWER
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def run_upstream(port: int, core: int | None) -> None:
    import uvicorn

    if core is not None:
        os.sched_setaffinity(0, {core})
    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="error", access_log=False)


def run_router(port: int, upstream: str, core: int | None) -> None:
    import logging

    import uvicorn

    from beluga.router.app import create_app
    from beluga.router.limits import uvicorn_config
    from beluga.router.settings import RouterSettings

    logging.disable(logging.INFO)
    if core is not None:
        os.sched_setaffinity(0, {core})
    s = RouterSettings(workers=[upstream], port=port, max_in_flight=4096, health_interval_s=5)
    uvicorn.Server(uvicorn_config(create_app(s), s, log_level="error")).run()  # the server as the router ships


def _request(port: int) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(BODY))) + BODY


async def _one(reader, writer, req: bytes) -> None:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:100])
    length = 0
    chunked = False
    for line in head.split(b"\r\n"):
        low = line.lower()
        if low.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if low.startswith(b"transfer-encoding:") and b"chunked" in low:
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)


async def _latency(port: int, n: int) -> np.ndarray:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = _request(port)
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        await _one(reader, writer, req)
        out[i] = time.perf_counter() - t
    writer.close()
    return out * 1e3


async def _throughput(port: int, conns: int, seconds: float) -> float:
    req = _request(port)
    done = 0
    stop = time.perf_counter() + seconds

    async def loop():
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            await _one(reader, writer, req)
            done += 1
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(conns)))
    return done / (time.perf_counter() - t)


def _client(kind: str, port: int, arg: int, seconds: float, q) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind == "latency":
        q.put(asyncio.run(_latency(port, arg)).tolist())
    else:
        q.put(asyncio.run(_throughput(port, arg, seconds)))


def client(kind: str, port: int, arg: int, seconds: float = 0):
    q = mp.Queue()
    p = mp.Process(target=_client, args=(kind, port, arg, seconds, q))
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def wait_up(port: int) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    two = len(cores) >= 2
    up_port, r_port = free_port(), free_port()
    procs = [mp.Process(target=run_upstream, args=(up_port, cores[0] if two else None)),
             mp.Process(target=run_router, args=(r_port, f"http://127.0.0.1:{up_port}", cores[1] if two else None))]
    for p in procs:
        p.start()
    try:
        wait_up(up_port)
        wait_up(r_port)
        time.sleep(1.0)  # the router's first health check
        direct = np.array(client("latency", up_port, a.requests))
        routed = np.array(client("latency", r_port, a.requests))
        rates = {}
        for conns in (8, 32, 64):
            rates[conns] = (client("throughput", up_port, conns, a.seconds),
                            client("throughput", r_port, conns, a.seconds))
        best = max(rates, key=lambda c: rates[c][1])
        out = {
            "upstream": "minimal ASGI app under uvicorn answering a fixed short completion (no model)",
            "machine": f"{os.cpu_count()} cores",
            "direct_p50_ms": float(np.percentile(direct, 50)), "direct_p99_ms": float(np.percentile(direct, 99)),
            "router_p50_ms": float(np.percentile(routed, 50)), "router_p99_ms": float(np.percentile(routed, 99)),
            "added_p50_ms": float(np.percentile(routed, 50) - np.percentile(direct, 50)),
            "added_p99_ms": float(np.percentile(routed, 99) - np.percentile(direct, 99)),
            "direct_rps": {c: r[0] for c, r in rates.items()}, "router_rps": {c: r[1] for c, r in rates.items()},
            "router_max_rps": rates[best][1], "at_connections": best,
        }
        out["targets_met"] = {"added_p50_lt_1ms": out["added_p50_ms"] < 1, "ge_1000_rps": out["router_max_rps"] >= 1000}
        print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of `histodetect serve` on loopback: throughput, latency, errors and memory.

    .venv/bin/python benchmarks/serve_load.py RUN [--requests 2000] [--max-patches 16000]
        [--concurrency 1 4 16] [--batch 1 32] [--data ../shared/data/pcam-jpeg/valid]

Starts the server for RUN in a subprocess on 127.0.0.1 (default limits and
batching, access log off), then, for each batch size (patches per request) and
concurrency, sends `--requests` POST /v1/predict multipart requests of real JPEG
patches (fewer for big batches: at most `--max-patches` patches per setting) from
`concurrency` async httpx clients, after 20 warm-up requests.
Reports requests/s, patches/s, p50 and p99 latency, errors (non-200 answers and
failed connections; target 0), patches per model call (the request batcher at
work, from /health), the server's CPU time per request (all its threads) and its
peak resident memory (VmHWM, over its life so far). The client shares the
machine's cores with the server: on a 2-core machine it takes a noticeable share
of the CPU at high request rates. `--max-wait-ms` overrides the batcher's wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

SHARED_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam-jpeg" / "valid"
WARM_UP_REQUESTS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, max_wait_ms: float | None) -> subprocess.Popen:
    config = f"ServeConfig(max_wait_ms={max_wait_ms})" if max_wait_ms is not None else "ServeConfig()"
    code = (f"from histodetect.serve import ServeConfig, serve_run; "
            f"serve_run({str(run)!r}, host='127.0.0.1', port={port}, config={config}, access_log=False)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health within 120 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of a process (Linux VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, payloads: list[list[tuple[str, bytes]]], n_requests: int, concurrency: int) -> dict:
    """Send n_requests (cycling through payloads) from `concurrency` clients; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n_requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            files = [("files", (name, data, "image/jpeg")) for name, data in payloads[i % len(payloads)]]
            start = time.perf_counter()
            try:
                response = await http.post(url, files=files)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "latencies": latencies, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (the cpu preset's, for BENCHMARKS.md)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per setting (default 2000)")
    parser.add_argument("--max-patches", type=int, default=16000,
                        help="at most this many patches per setting (default 16000: 500 requests of 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="patches per request")
    parser.add_argument("--data", type=Path, default=SHARED_VALID, help="folder of real .jpg patches")
    parser.add_argument("--max-wait-ms", type=float, help="the batcher's wait for more requests (default: the server's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    files = sorted(args.data.rglob("*.jpg"))
    if len(files) < max(args.batch):
        raise SystemExit(f"{args.data}: {len(files)} .jpg patches, need at least {max(args.batch)}")
    patches = [(f.name, f.read_bytes()) for f in files[:2048]]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args.run, port, args.max_wait_ms)
    rows = []
    try:
        for batch in args.batch:
            payloads = [patches[i : i + batch] for i in range(0, len(patches) - batch + 1, batch)]
            n_requests = min(args.requests, max(1, args.max_patches // batch))
            for concurrency in args.concurrency:
                asyncio.run(load(f"{base}/v1/predict", payloads, WARM_UP_REQUESTS, concurrency))
                before, cpu_before = httpx.get(f"{base}/health").json(), cpu_seconds(server.pid)
                result = asyncio.run(load(f"{base}/v1/predict", payloads, n_requests, concurrency))
                after, cpu_after = httpx.get(f"{base}/health").json(), cpu_seconds(server.pid)
                latencies_ms = 1000 * np.array(result["latencies"])
                row = {
                    "batch": batch, "concurrency": concurrency, "requests": n_requests,
                    "errors": len(result["errors"]), "requests_per_s": n_requests / result["seconds"],
                    "patches_per_s": n_requests * batch / result["seconds"],
                    "p50_ms": float(np.percentile(latencies_ms, 50)), "p99_ms": float(np.percentile(latencies_ms, 99)),
                    "patches_per_model_call": (after["patches"] - before["patches"])
                    / max(1, after["batches"] - before["batches"]),
                    "server_cpu_ms_per_request": 1000 * (cpu_after - cpu_before) / n_requests,
                    "server_peak_rss_mib": peak_rss_mib(server.pid),
                    "first_error": result["errors"][0] if result["errors"] else None,
                }
                rows.append(row)
                print(f"batch {batch:>3}  concurrency {concurrency:>3}: {row['requests_per_s']:8.1f} req/s "
                      f"{row['patches_per_s']:8.1f} patches/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"errors {row['errors']}  {row['patches_per_model_call']:.1f} patches/model call  "
                      f"server CPU {row['server_cpu_ms_per_request']:.1f} ms/request  "
                      f"server peak RSS {row['server_peak_rss_mib']:.0f} MiB", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    load_1min = os.getloadavg()[0]
    wait = "default" if args.max_wait_ms is None else f"{args.max_wait_ms:g} ms"
    print(f"\n{args.run} on {machine} (load average {load_1min:.1f} at the end), loopback, max wait {wait}\n")
    print("| patches/request | concurrency | requests | requests/s | patches/s | p50 ms | p99 ms | errors "
          "| patches/model call | server CPU ms/request | server peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
              f"{r['patches_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
              f"{r['patches_per_model_call']:.1f} | {r['server_cpu_ms_per_request']:.1f} | "
              f"{r['server_peak_rss_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Load test of `vpr serve` on localhost: concurrent clients posting photos, with batching on and off.

For each mode it starts `vpr serve` in a subprocess, warms it up, then runs `--clients` clients that
each post one query image after another for `--duration` seconds (after `--warmup` seconds of the
same load, not measured), and records requests/s, latency
percentiles, errors (any answer but 200, or a failed connection), the model's forward passes and
the server's resident memory (RSS, from /proc) at the start, every few seconds and at the end. The
clients run on the same machine as the server and share its cores. Writes one JSON file and prints
a Markdown table (the one in docs/serving.md).

    .venv/bin/python docs/measurements/serve_load.py [--index indexes/demo-small] [--clients 32] [--duration 60]
        [--out docs/measurements/results/serve_load.json] [--screenshot docs/serve-page.png]

`--screenshot` also saves the web page after one upload, taken with Playwright and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from vpr import api

VPR = [sys.executable, "-c", "from cli.app import main; main()"]
RSS_EVERY_S = 5.0
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Server:
    """`vpr serve` in a subprocess on a free port."""

    def __init__(self, index: Path, batching: bool, device: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*VPR, "serve", "--index", str(index), "--port", str(self.port), "--device", device,
                   "--batching" if batching else "--no-batching", "--max-in-flight", "1000"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vpr serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("vpr serve did not answer /health in time")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, photos: list[tuple[str, bytes]], clients: int, duration: float, k: int,
               pid: int) -> dict:
    """`clients` concurrent loops of POST /query for `duration` seconds; latencies, errors and RSS samples."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    rss = [(0.0, rss_mb(pid))]
    start = time.perf_counter()
    stop_at = start + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = i
        while time.perf_counter() < stop_at:
            name, data = photos[n % len(photos)]
            n += clients
            sent = time.perf_counter()
            try:
                response = await http.post("/query", files=[("images", (name, data, "image/jpeg"))], data={"k": str(k)})
                if response.status_code != 200:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    continue
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - sent)

    async def sample_rss() -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(RSS_EVERY_S)
            rss.append((round(time.perf_counter() - start, 1), rss_mb(pid)))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await asyncio.gather(sample_rss(), *(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - start
    rss.append((round(elapsed, 1), rss_mb(pid)))
    ms = np.array(latencies) * 1000
    return {
        "seconds": round(elapsed, 1), "requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "rss_start_mb": round(rss[0][1], 1), "rss_end_mb": round(rss[-1][1], 1),
        "rss_max_mb": round(max(v for _, v in rss), 1), "rss_samples_mb": [[t, round(v, 1)] for t, v in rss],
    }


def run_mode(index: Path, batching: bool, photos: list[tuple[str, bytes]], args: argparse.Namespace) -> dict:
    """One server, warmed up by `--warmup` seconds of the same load (not measured), then the measured load."""
    server = Server(index, batching, args.device)
    try:
        server.wait_ready()
        warmup = asyncio.run(load(server.url, photos, args.clients, args.warmup, args.k, server.process.pid))
        if warmup["errors"]:
            raise RuntimeError(f"errors while warming up: {warmup['errors_by_kind']}")
        before = server.health()
        result = asyncio.run(load(server.url, photos, args.clients, args.duration, args.k, server.process.pid))
        after = server.health()
        passes = after["forward_passes"] - before["forward_passes"]
        images = after["images"] - before["images"]
        result.update(forward_passes=passes, mean_batch=round(images / passes, 2) if passes else None)
        if args.screenshot and batching:
            screenshot(server.url, photos[0], args.screenshot)
        return {"batching": batching, **result}
    finally:
        server.stop()


def screenshot(url: str, photo: tuple[str, bytes], path: Path) -> None:
    """The page after one upload, as a PNG written through vpr's output safety."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.set_input_files("#file", files=[{"name": photo[0], "mimeType": "image/jpeg", "buffer": photo[1]}])
        expect(page.locator("[data-testid=match] img[src^='blob:']")).to_have_count(5)
        png = page.screenshot(full_page=True)
        browser.close()
    api.save_png(Image.open(io.BytesIO(png)), path, "--screenshot")


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version()}


def markdown(results: list[dict]) -> str:
    rows = ["| batching | requests/s | p50 ms | p99 ms | errors | forward passes | images per pass | RSS start → end (max) MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {'on' if r['batching'] else 'off'} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{r['errors']} | {r['forward_passes']} | {r['mean_batch']} | "
                    f"{r['rss_start_mb']} → {r['rss_end_mb']} ({r['rss_max_mb']}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("indexes/demo-small"))
    parser.add_argument("--queries", type=Path, default=Path("data/demo-city-small"), help="a dataset root or a folder of photos")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--photos", type=int, default=64, help="distinct query photos the clients cycle through")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="on,off", help="batching modes to run: on, off or on,off")
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/results/serve_load.json"))
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    queries = api.split(args.queries, "test")[1] if (args.queries / "images").is_dir() else api.images(args.queries)
    photos = [(p.name, p.read_bytes()) for p in queries.paths[:args.photos]]
    started = machine()
    results = [run_mode(args.index, mode == "on", photos, args) for mode in args.modes.split(",")]
    report = {"index": str(args.index), "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "k": args.k,
              "photos": len(photos), "device": args.device, "machine": started, "results": results}
    api.write_json(args.out, report)
    print(markdown(results))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

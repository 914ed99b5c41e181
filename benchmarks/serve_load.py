"""Serving throughput and latency: `resunet serve` under 1, 4 and 16 concurrent clients, with and without
micro-batching, against the Predictor's offline throughput on the same images in the same machine.

    python benchmarks/serve_load.py MODEL --images DIR [--count 24] [--requests 64] [--json OUT]

Offline before and after the serving runs (this process: `Predictor.predict`, one image per call, as `resunet
predict` runs; and `predict_batch` on groups of 8 for reference; the ratios use the mean of the two, which also shows
how much the machine drifted), the model freed in between; a real `resunet serve` process is started per setting; the clients are asyncio + httpx in this process, over loopback, each sending the next image as soon
as its previous answer (a palette PNG) arrived. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from resunet.data.images import IMAGE_SUFFIXES, read_image
from resunet.predict import load

SETTINGS = {"micro-batching (max-batch 8, max-wait 5 ms)": ["--max-batch", "8", "--max-wait-ms", "5"],
            "no batching (max-batch 1)": ["--max-batch", "1", "--max-wait-ms", "0"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def offline(model: str, arrays: list[np.ndarray], rounds: int) -> dict:
    predictor = load(model)
    for image in arrays[:2]:
        predictor.predict(image)
    started = time.perf_counter()
    for _ in range(rounds):
        for image in arrays:
            predictor.predict(image)
    single = rounds * len(arrays) / (time.perf_counter() - started)
    # Batches of up to 8 images of one shape (predict_batch refuses a mix; VOC holds 500×375 and 375×500 photos),
    # one untimed batch first: the batch shapes' first call is not part of the figure
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for image in arrays:
        by_shape.setdefault(image.shape, []).append(image)
    batches = [group[i:i + 8] for group in by_shape.values() for i in range(0, len(group), 8)]
    predictor.predict_batch(batches[0])
    started = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            predictor.predict_batch(batch)
    batched = rounds * len(arrays) / (time.perf_counter() - started)
    del predictor
    gc.collect()
    return {"images_per_s": single, "batched8_images_per_s": batched}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "resunet.cli", "serve", model, "--port", str(port),
                                "--log-level", "warning", *options])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"resunet serve exited with {process.returncode}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("resunet serve did not become ready")


async def load_test(url: str, bodies: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    counter = iter(range(clients))  # warm-up: one request per client
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def client() -> None:
            for i in counter:
                started = time.perf_counter()
                response = await http.post("/predict", content=bodies[i % len(bodies)])
                if response.status_code != 200:
                    raise SystemExit(f"request {i}: HTTP {response.status_code} {response.text[:200]}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(clients)))
        counter = iter(range(requests))
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .pt checkpoint or an exported .onnx file")
    parser.add_argument("--images", required=True, help="a folder of images")
    parser.add_argument("--count", type=int, default=24, help="images used (default 24)")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement (default 64)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:args.count]
    bodies = [p.read_bytes() for p in paths]
    arrays = [read_image(p) for p in paths]
    report = {"model": args.model, "images": f"{len(paths)} from {args.images}, {arrays[0].shape[1]}×"
              f"{arrays[0].shape[0]}", "cpu": cpu_name(), "commit": commit(),
              "serve": {}}
    print(f"{report['cpu']} · commit {report['commit']} · {args.model} · {report['images']}")
    rounds = max(1, args.requests // len(arrays))
    before = offline(args.model, arrays, rounds)
    for name, options in SETTINGS.items():
        process, url = start_server(args.model, options)
        try:
            rows = [asyncio.run(load_test(url, bodies, int(c), args.requests)) for c in args.clients.split(",")]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        report["serve"][name] = rows
    after = offline(args.model, arrays, rounds)
    report["offline"] = {"before": before, "after": after,
                         "images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2}
    print(f"offline Predictor.predict (one image per call): {report['offline']['images_per_s']:.2f} img/s (before "
          f"{before['images_per_s']:.2f}, after {after['images_per_s']:.2f}); predict_batch of 8: "
          f"{before['batched8_images_per_s']:.2f} / {after['batched8_images_per_s']:.2f} img/s")
    for name, rows in report["serve"].items():
        print(name)
        for row in rows:
            share = row["requests_per_s"] / report["offline"]["images_per_s"]
            row["vs_offline"] = share
            print(f"  {row['clients']:>2} clients: {row['requests_per_s']:6.2f} req/s ({share:4.0%} of offline)  "
                  f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

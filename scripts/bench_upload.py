"""The same image through POST /api/v1/analyze (a multipart file part) and /api/generate (base64 in
JSON), on a real server on loopback with the tiny random model and one generated token: medians of
`--reps` requests per route, client wall time and the server's `total_duration`; and how long
python-multipart takes to parse the form. Usage: python scripts/bench_upload.py [--side 2000] [--reps 5]"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image
from python_multipart import MultipartParser

import foveal
from foveal.bundled import build_random_model
from foveal.server import Metrics, ModelRegistry, ServerConfig, create_app, uvicorn_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=2000, help="the noise PNG's width and height")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    png = buf.getvalue()

    vlm = foveal.load(build_random_model(Path(tempfile.mkdtemp()) / "tiny"), dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(port=port, max_body_bytes=4 * len(png) + 2**20)
    registry = ModelRegistry(config, Metrics())
    registry.add_loaded(vlm, "tiny")
    server = uvicorn.Server(uvicorn_config(create_app(config, registry), config, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)

    opts = {"num_predict": 1, "temperature": 0}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
        routes = {
            "/api/v1/analyze": lambda: c.post("/api/v1/analyze", files=[("image", ("x.png", png, "image/png"))],
                                              data={"prompt": "hi", "stream": "false", "options": json.dumps(opts)}),
            "/api/generate": lambda: c.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                                   "options": opts,
                                                                   "images": [base64.b64encode(png).decode()]}),
        }
        print(f"{args.side}x{args.side} noise PNG, {len(png) / 2**20:.1f} MiB, {args.reps} requests per route")
        for name, post in routes.items():
            wall, total = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                r = post()
                wall.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                total.append(r.json()["total_duration"] / 1e9)
            print(f"  {name:16s} client wall {statistics.median(wall) * 1e3:6.0f} ms, "
                  f"total_duration {statistics.median(total) * 1e3:6.0f} ms")
    server.should_exit = True

    boundary = b"bench-boundary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n")
    best = float("inf")
    for _ in range(args.reps):
        out = bytearray()
        parser = MultipartParser(boundary, {"on_part_data": lambda d, s, e: out.extend(d[s:e])})
        t0 = time.perf_counter()
        for i in range(0, len(body), 65536):
            parser.write(body[i:i + 65536])
        best = min(best, time.perf_counter() - t0)
        assert bytes(out) == png
    print(f"  python-multipart parse of the form in 64 KiB chunks: {best * 1e3:.1f} ms (best of {args.reps})")


if __name__ == "__main__":
    main()

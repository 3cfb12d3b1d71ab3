"""foveal's real server (uvicorn on a free loopback port, in a thread) around an already loaded model."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from foveal.server import Metrics, ModelRegistry, ServerConfig, create_app, uvicorn_config

MODEL = "tiny"


class LiveServer:
    def __init__(self, vlm, load_kwargs=None, **config):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.config = ServerConfig(port=port, **config)
        metrics = Metrics()
        self.registry = ModelRegistry(self.config, metrics, load_kwargs or {"dtype": "float32"})
        self.registry.add_loaded(vlm, MODEL)
        self.app = create_app(self.config, self.registry, metrics)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

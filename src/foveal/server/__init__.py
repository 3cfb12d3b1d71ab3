"""HTTP server: Ollama-native (/api/*) and OpenAI-compatible (/v1/*) APIs over foveal models.

    foveal serve [MODEL ...] [--host 127.0.0.1] [--port 11435]
"""

from .app import create_app, serve, uvicorn_config
from .config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from .metrics import Metrics
from .models import ModelRegistry

__all__ = ["create_app", "serve", "uvicorn_config", "ServerConfig", "DEFAULT_HOST", "DEFAULT_PORT", "Metrics",
           "ModelRegistry"]

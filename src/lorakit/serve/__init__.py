"""Serving many adapters on one base model: the engine (engine.py: batching, adapters, decoding; it raises its
own errors) and the OpenAI-compatible HTTP app (app.py: routes, and the mapping of engine errors to HTTP)."""

from .app import APIError, create_app, serve
from .engine import Engine, ServeConfig

__all__ = ["APIError", "Engine", "ServeConfig", "create_app", "serve"]

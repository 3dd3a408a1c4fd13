"""OpenAI-compatible HTTP serving for GhostVis (`ghostvis serve`); needs the `serve` extra (fastapi, uvicorn)."""

from .server import create_app, main

__all__ = ["create_app", "main"]

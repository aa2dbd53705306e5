"""OpenAI-compatible serving of the full model with hot-swappable federated adapters."""

from coordinator.serve.app import build_app
from coordinator.serve.engine import Engine, EngineError

__all__ = ["Engine", "EngineError", "build_app"]

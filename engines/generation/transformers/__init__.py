"""The transformers generation backend (see backend.py and scheduler.py)."""

from engines.generation.transformers.backend import TransformersBackend

__all__ = ["TransformersBackend"]

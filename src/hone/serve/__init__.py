"""Serving fine-tuned models: a batching inference engine (several adapters over one loaded base) and
OpenAI-compatible routes (/v1/chat/completions, /v1/completions) that the service mounts."""

from hone.serve.engine import Completion, GenerationRequest, InferenceEngine, Pending, RequestError

__all__ = ["Completion", "GenerationRequest", "InferenceEngine", "Pending", "RequestError"]

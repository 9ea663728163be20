"""iap_openai_compat: a generic OpenAI-compatible chat backend for ipfs_accelerate_py."""

from .plugin import OpenAICompatAdapter

__all__ = ["OpenAICompatAdapter"]

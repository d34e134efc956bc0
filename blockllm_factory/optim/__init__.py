"""Pure-PyTorch BlockLLM optimizer. Nothing under this package imports LLaMA-Factory."""

from .blockllm import BlockLLM
from .selection import is_embedding_name

__all__ = ["BlockLLM", "is_embedding_name"]

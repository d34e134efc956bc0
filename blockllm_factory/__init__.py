"""BlockLLM (arXiv 2406.17296) for LLaMA-Factory.

Kept import-light on purpose: the site-packages hook imports this package in every Python process, so nothing
here may import torch or LLaMA-Factory when the package is imported. The optimizer lives in
:mod:`blockllm_factory.optim`; ``from blockllm_factory import BlockLLM`` imports it on first use (module
``__getattr__``), so the package itself stays standard-library only.
"""

import importlib

__version__ = "0.1.0"

# Public names of the optimizer room, imported on first access only (docs/architecture.md, "The rules").
_LAZY = {"BlockLLM": "blockllm_factory.optim"}
__all__ = ["BlockLLM", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""BlockLLM (arXiv 2406.17296) for LLaMA-Factory.

Kept import-light on purpose: the site-packages hook imports this package in every Python process, so nothing
here may import torch or LLaMA-Factory. The optimizer lives in :mod:`blockllm_factory.optim`.
"""

__version__ = "0.1.0"

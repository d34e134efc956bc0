"""The embedded default: a tiny Llama and small datasets that the project builds itself (no hub).

``python -m blockllm_factory.demo build DIR`` writes them (see :mod:`blockllm_factory.demo.assets`);
``recipes/demo/`` trains on them with ``llamafactory-cli``.
"""

"""Comparison harness: ``blockllm-factory bench SUITE.yaml --out DIR`` (see docs/benchmarks.md).

It only drives public commands: every run is its own ``llamafactory-cli train`` process; what is measured inside that
process comes from the patch surface :mod:`blockllm_factory.patches.metrics`.
"""

from .runner import run_bench
from .suite import Suite, SuiteError, load_suite

__all__ = ["Suite", "SuiteError", "load_suite", "run_bench"]

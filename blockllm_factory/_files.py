"""Files the package writes, shared by the harness and the patches: atomic writes (a report or result file is either
the old one or the complete new one, never half-written) and the names of the files a BlockLLM run leaves in its
output directory.

The lowest room of the package, beside ``__init__``: it imports the standard library only, so that the harness
(:mod:`blockllm_factory.bench`, :mod:`blockllm_factory.demo`) and the patches (:mod:`blockllm_factory.patches`) can
both use it without importing each other (tests/test_layout.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Written by the trainer wiring into output_dir (blockllm_factory/hf/telemetry.py); read by the demo's summary.
SELECTION_LOG = "blockllm_selection.jsonl"
SELECTION_PLOT = "blockllm_selection.png"
# The environment variable through which the benchmark harness asks a training process (patches/metrics.py) for
# its measurements: the path of the JSON file to write them to.
BENCH_OUT_ENV = "BLOCKLLM_FACTORY_BENCH_OUT"


def rank_path(out_path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of a multi-process bench run writes its figures: ``metrics.rank<N>.json`` beside the
    ``metrics.json`` that ``BLOCKLLM_FACTORY_BENCH_OUT`` names."""
    path = Path(out_path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Calls ``write(temporary_path)`` for a file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; a report is as readable as any other file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1, default=str) + "\n")

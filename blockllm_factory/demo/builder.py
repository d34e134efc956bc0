"""What every local build shares: a byte-level BPE tokenizer trained here, LLaMA-Factory dataset folders, and a
folder that is built once per key and replaced only when complete.

Used by the demo's assets (:mod:`blockllm_factory.demo.assets`), its domain text (:mod:`blockllm_factory.demo.domain`)
and the harness's models at real shapes (:mod:`blockllm_factory.bench.models`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

STAMP_NAME = "BUILD_STAMP"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE (any text encodes) trained on ``corpus``, with :data:`SPECIAL_TOKENS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **SPECIAL_TOKENS)


def write_datasets(dataset_dir: Path, datasets: Mapping[str, tuple[list[dict], dict]]) -> None:
    """A LLaMA-Factory ``dataset_dir``: ``<name>.json`` per dataset and ``dataset_info.json`` listing them.

    ``datasets`` maps a name to its records and its ``dataset_info`` entry less ``file_name``."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, (records, attributes) in datasets.items():
        file_name = f"{name}.json"
        (dataset_dir / file_name).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        info[name] = {"file_name": file_name, **attributes}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build_once(root: Path, key: str, write: Callable[[Path], None], force: bool = False) -> Path:
    """``root`` as ``write(folder)`` fills it, unless ``root`` already holds a build stamped with ``key``.

    ``write`` fills a sibling temporary folder that replaces ``root`` only when complete, so an interrupted build
    never leaves a half-written one behind."""
    stamp = root / STAMP_NAME
    if not force and stamp.is_file() and stamp.read_text().strip() == key:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write(staging)
        (staging / STAMP_NAME).write_text(key + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root

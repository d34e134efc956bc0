"""Models at real shapes without a hub: random weights built from a ``config.json`` (suite key ``model_config``).

``build_model(config, dtype, root)`` reads a config (for example ``recipes/models/qwen2.5_0.5b``), initialises the
model it describes from a fixed seed with the architecture's own initialiser (on the GPU where there is one: the 7B
shape takes seconds there and minutes on a CPU; the device is part of the build's key, as the two draw different
numbers), and saves it with ``save_pretrained``
in ``dtype``, beside a byte-level BPE tokenizer trained here on the demo's text. The vocabulary of that tokenizer is
small, but the model keeps the config's ``vocab_size`` (and every other value), so embedding and head have their real
shapes; only the special-token ids are set to the tokenizer's. The weights are random: the model is for measuring
memory and speed, not quality.

The folder ``root/<config name>-<dtype>`` holds the build with a ``BUILD_STAMP`` naming what decided its bytes (the
config, the dtype, the seed, this code and the library versions); a build with the same stamp is reused. Building
replaces the folder only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm_factory.demo import builder

BUILD_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_BUILD_DTYPE = "bfloat16"
SEED = 0
TOKENIZER_VOCAB = 2048
STAMP_NAME = builder.STAMP_NAME


class ModelConfigError(ValueError):
    """A ``model_config`` that names no readable config; the message says what was expected."""


@dataclass(frozen=True)
class ModelBuild:
    """What to build: a config file (random weights) or a pretrained source (``demo/pretrained.py``), and the dtype
    the weights are saved in."""

    config: Path | None  # the config.json file; None for a pretrained source
    dtype: str
    source: str | None = None  # a name of pretrained.SOURCES (suite key model_source)

    @property
    def name(self) -> str:
        """Folder name of the build: the config's folder name (or the source's name) and the dtype, e.g.
        ``qwen2.5_0.5b-bfloat16``, ``smollm2-135m-instruct-bfloat16``."""
        return f"{self.source or self.config.parent.name}-{self.dtype}"

    def describe(self) -> str:
        if self.source:
            from blockllm_factory.demo.pretrained import source

            return f"pretrained {source(self.source).description}"
        return f"random weights from {self.config}"

    def folder(self, root: Path) -> Path:
        return Path(root) / self.name


def config_file(path: str | os.PathLike, base_dir: Path | None = None) -> Path:
    """The ``config.json`` that ``path`` names (a folder holding one, or the file itself), checked to be a config.

    Raises :class:`ModelConfigError` when there is none or it is not a JSON object with a ``model_type``."""
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = (base_dir or Path.cwd()) / candidate
    file = candidate / "config.json" if candidate.is_dir() else candidate
    if not file.is_file():
        raise ModelConfigError(f"{path!r} is neither a folder holding config.json nor a config file")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelConfigError(f"{file} is not valid JSON ({error})") from error
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ModelConfigError(f"{file} has no 'model_type' (a transformers model config is expected)")
    return file.resolve()


def _load_config(file: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(file.parent if file.name == "config.json" else file)


def shape(file: Path) -> dict[str, Any]:
    """Parameter count of the config's model (storages counted once: tied weights once), without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config(file)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(param.numel() for param in model.parameters())  # parameters() yields tied weights once
    return {
        "architecture": type(model).__name__,
        "parameters": total,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def build_key(build: ModelBuild) -> str:
    """What decides the bytes of a build: the config, the dtype, the seed, this code and the corpus, the versions."""
    import tokenizers
    import torch
    import transformers

    from blockllm_factory.demo import data

    digest = hashlib.sha256()
    digest.update(build.config.read_bytes())
    digest.update(f"{build.dtype}|{SEED}|{TOKENIZER_VOCAB}|{_init_device()}".encode())
    for module_file in (Path(__file__), Path(data.__file__), Path(builder.__file__)):
        digest.update(module_file.read_bytes())
    for version in (torch.__version__, transformers.__version__, tokenizers.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def _init_device() -> str:
    """Where the random weights are drawn: the first GPU where there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _corpus() -> list[str]:
    """The demo's instructions and prose: the text the suites that use these models train on."""
    from blockllm_factory.demo import data

    items = data.examples(2000, seed=SEED)
    lines = ["Human: Assistant: System:"]
    lines += [data.prose(item) for item in items]
    lines += [f"{instruction}\n{query}\n{answer}" for instruction, query, answer, _ in items]
    return lines


def build_tokenizer(max_length: int) -> Any:
    """A byte-level BPE (any text encodes) trained on the demo's text, with the demo's special tokens."""
    return builder.train_tokenizer(_corpus(), TOKENIZER_VOCAB, max_length)


def _write(build: ModelBuild, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config(build.config)
    max_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
    tokenizer = build_tokenizer(max_length)
    if len(tokenizer) > config.vocab_size:
        raise ModelConfigError(
            f"{build.config}: vocab_size {config.vocab_size} is smaller than the built tokenizer ({len(tokenizer)})"
        )
    # Shapes stay the config's; only the special-token ids follow the tokenizer that ships with the build.
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    dtype = getattr(torch, build.dtype)
    device = _init_device()
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model


def build_model(build: ModelBuild, root: str | os.PathLike, force: bool = False) -> Path:
    """The folder of ``build`` under ``root``, built unless a build with the same key is there; returns the folder."""
    if build.dtype not in BUILD_DTYPES:
        raise ModelConfigError(f"build_dtype {build.dtype!r} is not one of {', '.join(BUILD_DTYPES)}")
    if build.source:
        from blockllm_factory.demo.pretrained import build as build_pretrained

        return build_pretrained(build.source, build.folder(Path(root)), build.dtype, force=force)
    return builder.build_once(
        build.folder(Path(root)).resolve(), build_key(build), lambda staging: _write(build, staging), force=force
    )

"""Shared fixtures. Keep additions additive: other test files rely on the names below.

``tiny_llamafactory_assets``: a tiny Llama (2 layers, hidden 32) with a locally trained byte-level BPE tokenizer and
four small datasets (sft, pt, pairwise, kto) registered in a ``dataset_info.json``, built once per test session in a
temporary folder, deterministically and without any hub.

``llamafactory_train``: runs the real, unmodified ``llamafactory-cli train <yaml>`` in a subprocess on CPU.

Tests marked ``cuda`` (tests/test_cuda.py) need a CUDA device: where torch sees none they are deselected, not skipped,
and the summary says how many and how to run them (``pytest -m cuda tests`` on a GPU machine).

The plain functions (the CLI's environment, the argument builder, the CLI runs) live in tests/helpers.py; test files
import them from there.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_cli, run_logged, tiny_config

SEED = 7
_DESELECTED_CUDA: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; deselected where torch sees none")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        _DESELECTED_CUDA.extend(item.nodeid for item in deselected)
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


def pytest_terminal_summary(terminalreporter):
    if _DESELECTED_CUDA:
        terminalreporter.write_line(
            f"{len(_DESELECTED_CUDA)} CUDA tests deselected: torch sees no CUDA device here "
            "(on a GPU machine: pytest -m cuda tests)"
        )


WORDS = (
    "apple river stone cloud green quick lazy brown fox dog bird tree house light dark blue red small large "
    "happy sad open close water fire earth wind sun moon star day night"
).split()


@dataclass(frozen=True)
class TinyAssets:
    model_dir: Path
    dataset_dir: Path


def _examples(count: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.sample(WORDS, 3)
        task = rng.choice(("reverse", "upper", "first"))
        if task == "reverse":
            answer = " ".join(reversed(words))
        elif task == "upper":
            answer = " ".join(word.upper() for word in words)
        else:
            answer = words[0]
        wrong = " ".join(rng.sample(WORDS, 3))
        examples.append({"instruction": f"{task}: {' '.join(words)}", "output": answer, "wrong": wrong})
    return examples


def _write_datasets(dataset_dir: Path) -> list[str]:
    examples = _examples(64, SEED)
    files = {
        "tiny_sft": [{"instruction": e["instruction"], "input": "", "output": e["output"]} for e in examples],
        "tiny_pt": [{"text": f"{e['instruction']} = {e['output']}"} for e in examples],
        "tiny_pairwise": [
            {"instruction": e["instruction"], "input": "", "chosen": e["output"], "rejected": e["wrong"]}
            for e in examples
        ],
        "tiny_kto": [
            {
                "instruction": e["instruction"],
                "input": "",
                "output": e["output"] if i % 2 else e["wrong"],
                "label": bool(i % 2),
            }
            for i, e in enumerate(examples)
        ],
    }
    info = {
        "tiny_sft": {"file_name": "tiny_sft.json"},
        "tiny_pt": {"file_name": "tiny_pt.json", "columns": {"prompt": "text"}},
        "tiny_pairwise": {
            "file_name": "tiny_pairwise.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
        "tiny_kto": {
            "file_name": "tiny_kto.json",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "label"},
        },
    }
    dataset_dir.mkdir(parents=True)
    for name, records in files.items():
        (dataset_dir / f"{name}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return [f"{r.get('instruction', r.get('text'))} {r.get('output', '')}" for r in files["tiny_sft"]]


def _write_model(model_dir: Path, corpus: list[str]) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    backend.train_from_iterator(
        corpus + ["Human: Assistant: System:"],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=list(specials.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.save_pretrained(model_dir)

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_llamafactory_assets(tmp_path_factory) -> TinyAssets:
    root = tmp_path_factory.mktemp("tiny_assets")
    corpus = _write_datasets(root / "data")
    _write_model(root / "model", corpus)
    return TinyAssets(model_dir=root / "model", dataset_dir=root / "data")


@pytest.fixture
def llamafactory_train(tiny_llamafactory_assets, tmp_path):
    """``run(overrides, name="run", **env)``: ``llamafactory-cli train`` on :func:`tiny_config` with ``overrides``,
    output in ``<tmp>/<name>``; returns the CompletedProcess with ``.output_dir`` and ``.log`` attached."""

    def run(overrides: dict, name: str = "run", timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
        config = tiny_config(tiny_llamafactory_assets, tmp_path / name, **overrides)
        result = run_cli("train", config, tmp_path, name, timeout=timeout, **env)
        result.output_dir = Path(config["output_dir"])
        return result

    return run


@dataclass(frozen=True)
class LlamaFactoryCLI:
    assets: TinyAssets

    def config(self, output_dir: Path, **overrides) -> dict:
        return tiny_config(self.assets, output_dir, **overrides)

    def run(self, command: str, config: dict, workdir: Path, name: str, timeout: int = 600, **env: str):
        return run_cli(command, config, workdir, name, timeout=timeout, **env)

    def python(
        self, script: str, workdir: Path, argv: list[str] = (), timeout: int = 600, **env: str
    ) -> subprocess.CompletedProcess:
        """Runs a Python script in a fresh interpreter (the import hook active) with the CLI's environment."""
        return run_logged([sys.executable, "-c", script, *argv], workdir, timeout, **env)


@pytest.fixture(scope="session")
def llamafactory_cli(tiny_llamafactory_assets) -> LlamaFactoryCLI:
    """Session-wide access to :func:`tiny_config` and :func:`run_cli` (for runs shared by several tests)."""
    return LlamaFactoryCLI(tiny_llamafactory_assets)

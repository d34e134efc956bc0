"""A GLUE recipe (``recipes/glue/<task>.yaml``): the task, the model, the data, and one section per method.

    task: mrpc                        # one of TASKS
    model: FacebookAI/roberta-base    # a hub name or a local folder
    dataset: nyu-mll/glue             # the hub dataset (its config is the task), used when no files are given
    train_file: null                  # local data instead: .csv, .tsv or .json/.jsonl with GLUE's columns
    validation_file: null
    max_length: 512
    methods: [blockllm, galore, full]
    training: {...}                   # TrainingArguments shared by every method
    blockllm: {...}                   # per method: TrainingArguments over `training`; for blockllm also the
    galore: {...}                     #   blockllm_* settings (BlockLLMConfig)
    full: {...}

Errors name the file, the key, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

METHODS = ("blockllm", "galore", "full")


@dataclasses.dataclass(frozen=True)
class Task:
    """GLUE's columns and metrics of one task (as in the ``nyu-mll/glue`` dataset)."""

    name: str
    keys: tuple[str, str | None]
    num_labels: int  # 1: regression (STS-B)
    metrics: tuple[str, ...]  # the first is the task's headline metric
    validation_split: str = "validation"


TASKS = {
    task.name: task
    for task in (
        Task("cola", ("sentence", None), 2, ("matthews_correlation", "accuracy")),
        Task("sst2", ("sentence", None), 2, ("accuracy",)),
        Task("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
        Task("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
        Task("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
        Task("mnli", ("premise", "hypothesis"), 3, ("accuracy",), validation_split="validation_matched"),
        Task("qnli", ("question", "sentence"), 2, ("accuracy",)),
        Task("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    )
}
KEYS = ("task", "model", "dataset", "train_file", "validation_file", "max_length", "methods", "training", *METHODS)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


@dataclasses.dataclass
class Recipe:
    path: str
    task: Task
    model: str
    dataset: str
    train_file: str | None
    validation_file: str | None
    max_length: int
    methods: list[str]
    training: dict[str, Any]
    method_settings: dict[str, dict[str, Any]]

    def arguments(self, method: str) -> dict[str, Any]:
        """The TrainingArguments and ``blockllm_*`` settings of ``method``: its section over ``training``."""
        return {**self.training, **self.method_settings.get(method, {})}


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
        if not isinstance(config, dict):
            raise RecipeError(f"override `{dotted}`: `{part}` is not a section")
    config[last] = value


def load_recipe(path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Reads and checks ``path``; ``overrides`` (``KEY=VALUE`` of the command line, dotted for a section's key, e.g.
    ``training.max_steps``) apply over the file."""
    from blockllm_factory.bench.suite import read_yaml

    try:
        config = read_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror})") from error
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: expected a mapping of {', '.join(KEYS)}")
    for key, value in (overrides or {}).items():
        _set(config, key, value)
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    task = config.get("task")
    if task not in TASKS:
        raise RecipeError(f"{path}: `task` must be one of {', '.join(TASKS)}, got {task!r}")
    methods = config.get("methods", list(METHODS))
    if not (isinstance(methods, list) and methods and all(method in METHODS for method in methods)):
        raise RecipeError(f"{path}: `methods` must be a list of {', '.join(METHODS)}, got {methods!r}")
    for key in ("training", *METHODS):
        if not isinstance(config.get(key) or {}, dict):
            raise RecipeError(f"{path}: `{key}` must be a mapping of TrainingArguments, got {config[key]!r}")
    files = [config.get("train_file"), config.get("validation_file")]
    if any(files) and not all(files):
        raise RecipeError(f"{path}: give both `train_file` and `validation_file` (local data), or neither (the hub)")
    max_length = config.get("max_length", 512)
    if not (isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 8):
        raise RecipeError(f"{path}: `max_length` must be an integer >= 8, got {max_length!r}")
    return Recipe(
        path=str(path),
        task=TASKS[task],
        model=str(config.get("model") or "FacebookAI/roberta-base"),
        dataset=str(config.get("dataset") or "nyu-mll/glue"),
        train_file=files[0],
        validation_file=files[1],
        max_length=max_length,
        methods=list(methods),
        training=dict(config.get("training") or {}),
        method_settings={method: dict(config.get(method) or {}) for method in METHODS},
    )

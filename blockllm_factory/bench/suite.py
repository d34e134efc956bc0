"""Benchmark suites: loading, validation, and the runs a suite stands for.

A suite is a YAML file::

    description: free text shown in the report            # optional
    demo_assets: runs/demo/assets                         # optional: build the embedded tiny model and data here
    env: {NAME: value}                                    # optional: environment of every training process
    base: {LLaMA-Factory training arguments}              # shared by every run
    groups: {name: {arguments}}                           # optional: e.g. model sizes; every method runs per group
    methods: {name: {argument overrides}}                 # one run per method (per group)

The arguments that make runs comparable (model, data, seed, steps, batch, see :data:`SHARED_KEYS`) may be set in
``base`` or ``groups`` only, so every method of a group trains the same model on the same data for the same number of
steps. ``output_dir`` belongs to the harness.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOP_LEVEL_KEYS = ("description", "demo_assets", "env", "base", "groups", "methods")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Arguments that must be equal across the methods of a group: set them in base or groups.
SHARED_KEYS = (
    "model_name_or_path",
    "train_from_scratch",
    "stage",
    "dataset",
    "dataset_dir",
    "eval_dataset",
    "val_size",
    "template",
    "cutoff_len",
    "max_samples",
    "packing",
    "streaming",
    "seed",
    "data_seed",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)
# Arguments the harness sets itself.
HARNESS_KEYS = ("output_dir",)
# Set when the suite does not say otherwise: the measurements need the token count, and a benchmark reports nowhere.
DEFAULTS = {"do_train": True, "report_to": "none", "include_num_input_tokens_seen": "non_padding"}
REQUIRED_KEYS = ("model_name_or_path", "stage", "dataset")
# Arguments naming local files or folders: made absolute when they exist, so a run means the same from any directory.
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "dataset_dir", "deepspeed", "tokenized_path", "cache_dir")
KINDS = ("blockllm", "full", "lora", "galore", "badam")
MAX_STAMPED_FILES = 10000


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file and the key."""


@dataclass
class Run:
    """One training process of a suite."""

    name: str  # "method" or "group/method"
    method: str
    group: str | None
    kind: str
    args: dict[str, Any]
    env: dict[str, str]
    problem: str | None = None  # set when the run cannot start (reported as failed, the others still run)
    inputs: dict[str, str] = field(default_factory=dict)  # local model/data path -> stamp of its files

    @property
    def fingerprint(self) -> str:
        """Same arguments, environment and local input files, same fingerprint: a completed run is not run again."""
        text = json.dumps({"args": self.args, "env": self.env, "inputs": self.inputs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Suite:
    path: Path
    description: str
    demo_assets: Path | None
    runs: list[Run]

    @property
    def groups(self) -> list[str | None]:
        return list(dict.fromkeys(run.group for run in self.runs))


def method_kind(args: dict[str, Any]) -> str:
    """Which of the compared methods a run is, from its arguments (LLaMA-Factory's default finetuning type is lora)."""
    if _true(args.get("use_badam")):
        return "badam"
    if _true(args.get("use_galore")):
        return "galore"
    return str(args.get("finetuning_type", "lora"))


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def known_arguments() -> set[str] | None:
    """Every argument ``llamafactory-cli train`` accepts (with this package's patches), or None if unknown."""
    if os.environ.get("ALLOW_EXTRA_ARGS", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from dataclasses import fields

        from llamafactory.hparams import RayArguments, parser
    except Exception:  # noqa: BLE001 - without LLaMA-Factory the runs themselves report what is missing
        return None
    classes = list(getattr(parser, "_TRAIN_ARGS", ())) + [RayArguments]
    names = {item.name for cls in classes for item in fields(cls)}
    return names or None


def _unknown(keys: list[str], known: set[str] | None, where: str) -> str | None:
    if known is None:
        return None
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            return f"{where}: unknown LLaMA-Factory argument {key!r}{hint}"
    return None


def _mapping(value: Any, where: str, source: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{source}: {where} must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SuiteError(f"{source}: {where} has a non-text key {key!r}")
    return dict(value)


def _named(value: Any, where: str, source: Path, required: bool) -> dict[str, dict[str, Any]]:
    entries = _mapping(value, where, source)
    if required and not entries:
        raise SuiteError(f"{source}: {where} must name at least one method, e.g. `full: {{finetuning_type: full}}`")
    for name, overrides in entries.items():
        if not NAME_PATTERN.match(name):
            raise SuiteError(
                f"{source}: {where}.{name}: a name may hold letters, digits, '_', '.' and '-', "
                "and starts with a letter or digit"
            )
        entries[name] = _mapping(overrides, f"{where}.{name}", source)
    return entries


def stamp(path: Path) -> str:
    """Names, sizes and modification times of the files under ``path``: changes when a model or dataset is rebuilt."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:MAX_STAMPED_FILES]
    digest = hashlib.sha256()
    for item in files:
        status = item.stat()
        name = item.relative_to(path) if item != path else ""
        digest.update(f"{name}|{status.st_size}|{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def resolve_paths(suite: Suite, base_dir: Path | None = None) -> None:
    """Makes the arguments naming existing local files absolute and stamps them (once the demo assets exist)."""
    base_dir = base_dir or Path.cwd()
    stamps: dict[Path, str] = {}
    for run in suite.runs:
        for key in PATH_KEYS:
            value = run.args.get(key)
            if isinstance(value, str) and value and (base_dir / value).exists():
                path = (base_dir / value).resolve()
                run.args[key] = str(path)
                if path not in stamps:
                    stamps[path] = stamp(path)
                run.inputs[key] = stamps[path]


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line, the value read as YAML (``max_steps=20`` gives an int)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SuiteError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_steps=20")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_suite(path: str | os.PathLike, settings: dict[str, Any] | None = None, check_arguments: bool = True) -> Suite:
    """Reads and validates a suite; ``settings`` (from ``--set``) override every run's arguments, last.

    Raises :class:`SuiteError` naming the file and the key."""
    import yaml

    source = Path(path)
    if not source.is_file():
        raise SuiteError(f"{source}: no such suite file")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SuiteError(f"{source}: not valid YAML ({error})") from error
    top = _mapping(raw, "the suite", source)
    for key in top:
        if key not in TOP_LEVEL_KEYS:
            raise SuiteError(f"{source}: unknown top-level key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    if "base" not in top or "methods" not in top:
        missing = "base" if "base" not in top else "methods"
        raise SuiteError(f"{source}: missing top-level key {missing!r} (a suite needs base: and methods:)")

    base = _mapping(top["base"], "base", source)
    settings = dict(settings or {})
    for key in HARNESS_KEYS:
        if key in settings:
            raise SuiteError(f"--set {key}: set by the harness (DIR/runs/<run>/output)")
    groups = _named(top.get("groups"), "groups", source, required=False)
    methods = _named(top["methods"], "methods", source, required=True)
    env = _mapping(top.get("env"), "env", source)
    for key, value in env.items():
        if not isinstance(value, (str, int, float, bool)):
            raise SuiteError(f"{source}: env.{key} must be a text or number, got {type(value).__name__}")
    env = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in env.items()}
    description = top.get("description") or ""
    if not isinstance(description, str):
        raise SuiteError(f"{source}: description must be text")
    demo_assets = top.get("demo_assets")
    if demo_assets is not None and not isinstance(demo_assets, str):
        raise SuiteError(f"{source}: demo_assets must be a folder path (text)")

    for where, args in [("base", base)] + [(f"groups.{name}", args) for name, args in groups.items()]:
        for key in HARNESS_KEYS:
            if key in args:
                raise SuiteError(f"{source}: {where}.{key} is set by the harness (DIR/runs/<run>/output); remove it")
    for name, args in methods.items():
        for key in HARNESS_KEYS:
            if key in args:
                raise SuiteError(f"{source}: methods.{name}.{key} is set by the harness; remove it")
        for key in SHARED_KEYS:
            if key in args:
                raise SuiteError(
                    f"{source}: methods.{name}.{key}: {key!r} must be the same for every method "
                    f"(model, data, seed, steps and batch); set it in base{' or groups' if groups else ''}"
                )

    known = known_arguments() if check_arguments else None
    problem = _unknown(list(base), known, f"{source}: base") or _unknown(list(settings), known, "--set")
    for name, args in groups.items():
        problem = problem or _unknown(list(args), known, f"{source}: groups.{name}")
    if problem:
        raise SuiteError(problem)

    cwd = Path.cwd()
    runs: list[Run] = []
    for group, group_args in (groups or {None: {}}).items():
        shared = {**DEFAULTS, **base, **group_args, **settings}
        for key in REQUIRED_KEYS:
            if shared.get(key) in (None, ""):
                where = "base" + (f" or groups.{group}" if group else "")
                raise SuiteError(f"{source}: missing required argument {key!r} (set it in {where})")
        for method, overrides in methods.items():
            # A method may drop a base argument by setting it to null.
            merged = {**shared, **overrides, **settings}
            args = {key: value for key, value in merged.items() if value is not None}
            runs.append(
                Run(
                    name=f"{group}/{method}" if group else method,
                    method=method,
                    group=group,
                    kind=method_kind(args),
                    args=args,
                    env=env,
                    problem=_unknown(list(overrides), known, f"methods.{method}"),
                )
            )
    return Suite(
        path=source.resolve(),
        description=description.strip(),
        demo_assets=(cwd / demo_assets).resolve() if demo_assets else None,
        runs=runs,
    )

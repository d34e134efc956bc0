"""Runs a suite: one ``llamafactory-cli train`` process per run, measured by :mod:`blockllm_factory.patches.metrics`.

Layout of ``--out DIR``::

    report.json  report.md  loss.png  memory.png      rewritten (atomically) after every run
    runs/<run>/train.yaml                             the exact arguments given to llamafactory-cli
    runs/<run>/train.log                              its stdout and stderr
    runs/<run>/metrics.json                           what the measurement callback wrote
    runs/<run>/result.json                            the run's row of the report; present = finished
    runs/<run>/output/                                LLaMA-Factory's output_dir (weights removed unless kept)

    models/<config>-<dtype>/                          models built from a suite's model_config (random weights)

A run whose ``result.json`` says ``ok`` (or ``out of memory``: a result too) for the same arguments and environment is
skipped on the next invocation; a failed run is tried again. A run that ran out of memory (CUDA's or the host
allocator's error in its log) is recorded with that status, the figures measured until then and its group (the model
shape), and the suite goes on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from blockllm_factory._files import BENCH_OUT_ENV, rank_path, write_json, write_text

from . import report
from .report import OK_STATUSES, human_bytes
from .suite import Run, Suite, SuiteError, load_suite, plan, resolve_paths

RESULT_FILE = "result.json"
FINAL_LOSS_SHARE = 0.1  # final_train_loss: mean of the logged losses over the last 10% of the steps
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "checkpoint-*")
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|AssertionError|KeyError)\b.*")
# CUDA's allocator (torch.OutOfMemoryError, "CUDA out of memory"), the CPU allocator, Python's MemoryError.
OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|CUDA out of memory|DefaultCPUAllocator: can't allocate|\bMemoryError\b")
OUT_OF_MEMORY_STATUS = "out of memory"
MODELS_DIR = "models"
RUN_FIELDS = (
    "peak_memory_bytes",
    "peak_memory_source",
    "peak_rss_bytes",
    "peak_tracked_bytes",
    "peak_storage_bytes",
    "peak_composition",
    "untracked_bytes",
    "peak_phase",
    "peak_step",
    "peak_largest",
    "memory_snapshot",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "master_weight_bytes",
    "trainable_parameters",
    "eligible_parameters",
    "total_parameters",
    "parameter_dtypes",
    "optimizer",
    "device_name",
    "steps",
    "step_time_s",
    "step_cpu_time_s",
    "load_average",
    "tokens",
    "tokens_per_s",
    "gradient_samples",
    "profiled_steps",
    "world_size",
    "engine",
)
# What each rank of a multi-process run reports (runs/<run>/metrics.rank<N>.json), kept per rank in ``ranks``.
RANK_FIELDS = (
    "rank",
    "peak_storage_bytes",
    "peak_storage_bytes_after_first_step",
    "peak_composition",
    "untracked_bytes",
    "peak_phase",
    "peak_step",
    "peak_largest",
    "peak_tracked_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "master_weight_bytes",
    "collective_bytes_per_step",
    "collective_bytes_by_op",
    "collective_calls_by_op",
    "collective_bytes_outside_steps",
)


def llamafactory_cli() -> str:
    beside = Path(sys.executable).with_name("llamafactory-cli")
    found = str(beside) if beside.is_file() else shutil.which("llamafactory-cli")
    if not found:
        raise FileNotFoundError("llamafactory-cli not found; install blockllm-factory[llamafactory]")
    return found


def final_train_loss(loss_curve: list[list[float]]) -> float | None:
    """Mean of the logged training losses over the last 10% of the steps (at least the last one logged)."""
    if not loss_curve:
        return None
    last_step = loss_curve[-1][0]
    window = max(1.0, FINAL_LOSS_SHARE * last_step)
    tail = [loss for step, loss in loss_curve if step > last_step - window] or [loss_curve[-1][1]]
    return sum(tail) / len(tail)


def error_from_log(log_path: Path, returncode: int | None) -> str:
    """The line that says what went wrong (the last exception line of the log), with the exit status."""
    try:
        lines = [line.rstrip() for line in log_path.read_text(errors="replace").splitlines()[-400:]]
    except OSError:
        lines = []
    lines = [line for line in lines if line.strip()]
    hook = next((line for line in lines if line.startswith("blockllm-factory: could not patch")), None)
    cause = next((line for line in reversed(lines) if ERROR_LINE.match(line.strip())), None)
    if cause is None and lines:
        cause = lines[-1]
    if returncode is None:
        status = "training process did not start"
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        status = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        status = f"exit code {returncode}"
    parts = [status] + ([cause.strip()[:500]] if cause else []) + ([hook] if hook and hook != cause else [])
    return "; ".join(parts)


def out_of_memory(log_path: Path) -> bool:
    """Whether the run's log ends in an allocator's out-of-memory error."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return False
    return any(OUT_OF_MEMORY.search(line) for line in lines)


def _record(run: Run, status: str, error: str | None, metrics: dict[str, Any], wall: float, log: Path) -> dict:
    loss_curve = metrics.get("loss_curve") or []
    eval_curve = metrics.get("eval_curve") or []
    exact_match_curve = metrics.get("exact_match_curve") or []
    record: dict[str, Any] = {
        "name": run.name,
        "method": run.method,
        "group": run.group,
        "kind": run.kind,
        "config": run.config,
        "seed": run.seed,
        "sweep": run.sweep,
        "status": status,
        "error": error,
    }
    record.update({key: metrics.get(key) for key in RUN_FIELDS})
    record["ranks"] = [{key: rank.get(key) for key in RANK_FIELDS} for rank in metrics.get("ranks") or []] or None
    sparsity = None
    if run.kind == "blockllm":
        sparsity = run.args.get("blockllm_sparsity", metrics.get("sparsity"))
    record.update(
        {
            "final_train_loss": final_train_loss(loss_curve),
            "eval_loss": eval_curve[-1][1] if eval_curve else None,
            "eval_exact_match": exact_match_curve[-1][1] if exact_match_curve else None,
            "exact_match_curve": exact_match_curve,
            "loss_curve": loss_curve,
            "eval_curve": eval_curve,
            "wall_time_s": round(wall, 1),
            "sparsity": sparsity,
            "trained": report.describe_trained(metrics.get("parameters")),
            "largest_layer_parameters": report.largest_layer(metrics.get("parameters")),
        }
    )
    record["trains"] = record["trained"]["summary"] if record["trained"] else None
    floor = report.floor(record, run.args)
    record["floor_bytes"], record["floor_formula"] = floor if floor else (None, None)
    record.update(report.rank_targets(record, run.args) or {})
    record.update({"fingerprint": run.fingerprint, "log": str(log), "args": run.args, "host": host_info()})
    return record


def read_ranks(metrics_path: Path) -> list[dict[str, Any]]:
    """Every rank's figures of a multi-process run, by rank (empty for one process)."""
    ranks = []
    for rank in range(64):
        path = rank_path(metrics_path, rank)
        if not path.is_file():
            break
        ranks.append(json.loads(path.read_text()))
    return ranks


def _stored(run_dir: Path, run: Run) -> dict | None:
    try:
        stored = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("fingerprint") == run.fingerprint else None


def _drop_weights(output_dir: Path) -> None:
    for pattern in WEIGHT_PATTERNS:
        for path in output_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def execute(run: Run, run_dir: Path, cli: str, keep_models: bool = False) -> dict:
    """Trains one run in its own process and returns its report row; never raises for a failed training."""
    import yaml

    log = run_dir / "train.log"
    if run.problem:
        return _record(run, "failed", run.problem, {}, 0.0, log)
    if run_dir.exists():  # run_bench has set an earlier result aside (replacing); a direct call starts clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    metrics_path = run_dir / "metrics.json"
    config = run_dir / "train.yaml"
    config.write_text(yaml.safe_dump({**run.args, "output_dir": str(run_dir / "output")}, sort_keys=False))
    env = {**os.environ, **run.env, BENCH_OUT_ENV: str(metrics_path)}
    started = time.monotonic()
    returncode: int | None = None
    with open(log, "wb") as log_stream:
        try:
            process = subprocess.Popen(
                [cli, "train", str(config)],
                stdout=log_stream,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as error:
            log_stream.write(f"{type(error).__name__}: {error}\n".encode())
        else:
            try:
                returncode = process.wait()
            except BaseException:  # Ctrl-C: stop the whole training process group, record nothing
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                raise
    wall = time.monotonic() - started
    metrics: dict[str, Any] = {}
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics["ranks"] = read_ranks(metrics_path)
    if returncode != 0:
        if out_of_memory(log):
            error = f"{OUT_OF_MEMORY_STATUS}: {error_from_log(log, returncode)}"
            return _record(run, OUT_OF_MEMORY_STATUS, error, metrics, wall, log)
        return _record(run, "failed", error_from_log(log, returncode), metrics, wall, log)
    if not metrics or not metrics.get("steps"):
        error = (
            "training finished but the measurement callback wrote no steps; is blockllm_factory installed in the "
            f"environment of {cli} (import hook active, BLOCKLLM_FACTORY_DISABLE unset)? "
            + error_from_log(log, returncode)
        )
        return _record(run, "failed", error, metrics, wall, log)
    if not keep_models:
        _drop_weights(run_dir / "output")
    return _record(run, "ok", None, metrics, wall, log)


def _set_aside(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.previous")


def restore_interrupted(run_dir: Path) -> None:
    """An earlier result set aside by a rerun that never finished (the harness itself was killed) goes back in
    place; an unfinished rerun's files (no result.json) are dropped."""
    previous = _set_aside(run_dir)
    if not previous.is_dir():
        return
    if (run_dir / RESULT_FILE).is_file():  # the rerun finished: the earlier result is no longer wanted
        shutil.rmtree(previous)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(previous, run_dir)


def execute_replacing(run: Run, run_dir: Path, cli: str, keep_models: bool = False) -> dict:
    """:func:`execute`, then its ``result.json``; a stored result is replaced only once the new one is complete.

    The earlier run's folder is set aside while the new run trains and is put back if it is interrupted (Ctrl-C,
    an error of the harness), so that ``--force`` never loses a result that report.json still lists."""
    previous = _set_aside(run_dir)
    if run_dir.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(run_dir, previous)
    try:
        record = execute(run, run_dir, cli, keep_models=keep_models)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RESULT_FILE, record)
    except BaseException:
        restore_interrupted(run_dir)
        raise
    if previous.exists():
        shutil.rmtree(previous)
    return record


def progress_line(index: int, total: int, record: dict, skipped: bool = False) -> str:
    head = f"[bench {index}/{total}] {record['name']}:"
    if skipped:
        what = "ran out of memory" if record["status"] == OUT_OF_MEMORY_STATUS else "completed"
        return f"{head} skipped, {what} earlier with the same arguments (--force runs it again)"
    if record["status"] == OUT_OF_MEMORY_STATUS:
        peak = human_bytes(record.get("peak_memory_bytes"))
        return f"{head} OUT OF MEMORY after {record['wall_time_s']:.0f} s (peak before it {peak}): {record['error']}"
    if record["status"] != "ok":
        return f"{head} FAILED after {record['wall_time_s']:.0f} s: {record['error']}"
    source = "peak RSS" if record.get("peak_memory_source") == "cpu_peak_rss" else "CUDA max allocated"
    parts = [
        f"ok in {record['wall_time_s']:.0f} s",
        f"peak {human_bytes(record['peak_memory_bytes'])} ({source})",
        f"grads {human_bytes(record['gradient_bytes'])}",
        f"states {human_bytes(record['optimizer_state_bytes'])}",
        f"step {record['step_time_s']:.3f} s" if record.get("step_time_s") is not None else "step n/a",
        f"loss {record['final_train_loss']:.4f}" if record.get("final_train_loss") is not None else "loss n/a",
        f"eval {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else "eval n/a",
    ]
    return f"{head} " + " | ".join(parts)


def host_info() -> dict[str, Any]:
    """This machine: platform, Python, processor, cores and memory (stored with every run it executes)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
    }


def machine_info(records: list[dict]) -> dict[str, Any]:
    """Where the runs ran: the host stored with the runs (the first run's; a report assembled elsewhere keeps it),
    else this machine; plus devices, memory sources and the library versions here."""
    from importlib import metadata

    hosts = [r["host"] for r in records if isinstance(r.get("host"), dict)]
    host = hosts[0] if hosts else host_info()
    versions = {}
    for package in (
        "torch",
        "transformers",
        "llamafactory",
        "peft",
        "trl",
        "badam",
        "galore-torch",
        "apollo-torch",
        "bitsandbytes",
        "blockllm-factory",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = sorted({r["device_name"] for r in records if r.get("status") == "ok" and r.get("device_name")})
    sources = sorted({r["peak_memory_source"] for r in records if r.get("peak_memory_source")})
    return {
        **host,
        "hosts": len({json.dumps(h, sort_keys=True) for h in hosts}) or None,
        "devices": devices,
        "peak_memory_sources": sources,
        "versions": versions,
    }


def select(suite: Suite, only: list[str] | None) -> list[Run]:
    """The runs ``--only`` names: a run, a method, a group, or a leading part of run names (``blockllm/seed=1``)."""
    if not only:
        return suite.runs

    def named(run: Run, name: str) -> bool:
        return run.method == name or run.name == name or run.name.startswith(name.rstrip("/") + "/")

    unknown = [name for name in only if not any(named(run, name) for run in suite.runs)]
    if unknown:
        names = sorted({run.name for run in suite.runs} | {run.method for run in suite.runs})
        raise SuiteError(f"--only {unknown[0]!r}: no such run or method (runs: {', '.join(names)})")
    return [run for run in suite.runs if any(named(run, name) for name in only)]


def build_models(suite: Suite, selected: list[Run], out: Path, stream: IO[str]) -> None:
    """Builds (or reuses) the models (random weights, or a pretrained source) of the selected runs under
    ``out/models`` and points every run of the suite at its model, so that stored results of runs not selected keep
    their fingerprints."""
    from .models import build_model

    needed = {run.build for run in selected if run.build is not None}
    for build in suite.builds:
        folder = build.folder(out / MODELS_DIR)
        if build in needed:
            print(f"[bench] model {build.name}: {build.describe()} ({folder})", file=stream, flush=True)
            build_model(build, out / MODELS_DIR)
        for run in suite.runs:
            if run.build == build:
                run.args["model_name_or_path"] = str(folder)


def run_bench(
    suite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    only: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    keep_models: bool = False,
    command: str | None = None,
    stream: IO[str] | None = None,
) -> dict:
    """Runs (or resumes) a suite and writes the report; returns the report. Raises SuiteError for a bad suite."""
    stream = stream or sys.stdout
    suite: Suite = load_suite(suite_path, settings=overrides, seeds=seeds)
    selected = select(suite, only)
    for run in suite.runs:
        if run.problem:
            print(f"[bench] {run.name} cannot run and will be recorded as failed: {run.problem}", file=stream)
    if suite.demo_assets is not None:
        print(f"[bench] embedded tiny model and data: {suite.demo_assets}", file=stream, flush=True)
        from blockllm_factory.demo.assets import build  # reuses an up-to-date build

        build(suite.demo_assets)
    if suite.domain_text is not None:
        print(f"[bench] unseen-domain text: {suite.domain_text}", file=stream, flush=True)
        from blockllm_factory.demo import domain  # reuses an up-to-date build

        domain.build(suite.domain_text)
    cli = llamafactory_cli()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    build_models(suite, selected, out, stream)
    resolve_paths(suite)

    records: dict[str, dict] = {}
    for run in suite.runs:  # results of earlier invocations (same arguments) stay in the report
        restore_interrupted(out / "runs" / run.name)
        stored = _stored(out / "runs" / run.name, run)
        if stored is not None:
            records[run.name] = stored
    for index, run in enumerate(selected, start=1):
        run_dir = out / "runs" / run.name
        stored = records.get(run.name)
        if not force and stored is not None and stored.get("status") in OK_STATUSES:
            print(progress_line(index, len(selected), stored, skipped=True), file=stream, flush=True)
            continue
        print(
            f"[bench {index}/{len(selected)}] {run.name}: training ({run_dir / 'train.log'})", file=stream, flush=True
        )
        record = execute_replacing(run, run_dir, cli, keep_models=keep_models)
        records[run.name] = record
        print(progress_line(index, len(selected), record), file=stream, flush=True)
        _write_report(suite, out, records, command)
    return _write_report(suite, out, records, command)


def plan_bench(
    suite_path: str | os.PathLike,
    *,
    only: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    stream: IO[str] | None = None,
) -> list[Run]:
    """``--plan``: validates the suite and prints the runs it stands for and the shapes it builds; trains nothing."""
    stream = stream or sys.stdout
    suite = load_suite(suite_path, settings=overrides, seeds=seeds)
    selected = select(suite, only)
    lines = plan(suite)
    if only:
        names = {run.name for run in selected}
        lines = [line for line in lines if not line.startswith("  ") or line.split(":")[0].strip() in names]
    print("\n".join(lines), file=stream, flush=True)
    return selected


def _write_report(suite: Suite, out: Path, records: dict[str, dict], command: str | None) -> dict:
    ordered = [records[run.name] for run in suite.runs if run.name in records]
    document = {
        "suite": str(suite.path),
        "description": suite.description,
        "command": command,
        "seeds": suite.seeds,
        "goals": suite.goals,
        "machine": machine_info(ordered),
        "runs": ordered,
    }
    from . import plots  # matplotlib: imported only once a report is written

    document["results"] = report.summarize(document["runs"])
    write_json(out / "report.json", document)
    write_text(out / "report.md", report.markdown(document))
    plots.loss_plot(document["runs"], out / "loss.png")
    plots.memory_plot(document["results"], out / "memory.png")
    return document

"""The report of a suite: ``report.json``, ``report.md`` (tables, ratios to full fine-tuning, goals) and the plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import write_json, write_text

# The goals of issue 5 (BlockLLM against the other four methods, same model and batch).
GOAL_SPARSITY = 0.95
SHARE_OF_FULL = 0.055  # optimizer-state and gradient bytes, at most this share of full fine-tuning's
STEP_TIME_SHARE_OF_FULL = 0.75
STEP_TIME_SHARE_OF_BADAM = 1.05
BASELINES = ("full", "lora", "galore", "badam")


@dataclass
class Goal:
    text: str
    status: str  # "met", "missed" or "not measured"
    detail: str


def human_bytes(value: Any) -> str:
    """Four significant digits, trailing zeros kept, so that close figures stay tellable apart: 1.031 GiB."""
    if not isinstance(value, (int, float)):
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= 1000 * size / 1024:
            number = value / size
            decimals = 3 if abs(number) < 10 else 2 if abs(number) < 100 else 1
            return f"{number:.{decimals}f} {unit}"
    return f"{value:.0f} B"


def _number(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ratio(value: Any, reference: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or reference <= 0:
        return "n/a"
    return f"{value / reference:.3g}x"


def _usable(record: dict | None, key: str) -> bool:
    return record is not None and record.get("status") == "ok" and isinstance(record.get(key), (int, float))


def _fmt(key: str, value: Any) -> str:
    if key.endswith("_bytes"):  # one unit in every goal line, fine enough to tell close peaks apart
        return f"{value / 2**20:,.2f} MiB" if isinstance(value, (int, float)) else "n/a"
    return f"{_number(value, 3)} s" if key.endswith("_s") else _number(value)


def _compare(
    text: str, subject: dict, key: str, references: list[tuple[str, dict | None]], factor: float, strict: bool
) -> Goal:
    """Goal ``subject[key] (<|<=) factor * reference[key]`` for every reference: missed as soon as one comparison
    fails, met only when all of them could be made and hold."""
    if not _usable(subject, key):
        return Goal(text, "not measured", f"{subject['name']} has no {key} ({subject.get('status')})")
    value = subject[key]
    parts, failed, missing = [], False, False
    for label, reference in references:
        if not _usable(reference, key):
            missing = True
            why = "not in the suite" if reference is None else f"{reference['name']} {reference.get('status')}"
            parts.append(f"{label}: {why}")
            continue
        bound = factor * reference[key]
        holds = value < bound if strict else value <= bound
        failed |= not holds
        scaled = f"{factor:g} x {_fmt(key, reference[key])} = {_fmt(key, bound)}" if factor != 1 else _fmt(key, bound)
        parts.append(f"{label} {scaled} ({'holds' if holds else 'does not hold'})")
    status = "missed" if failed else "not measured" if missing else "met"
    return Goal(text, status, f"{subject['name']} {_fmt(key, value)}; " + "; ".join(parts))


def goals(group_records: list[dict]) -> list[tuple[dict, list[Goal], str | None]]:
    """For every BlockLLM run of a group: its goals and a note on the sparsity it ran at."""
    first = {kind: next((r for r in group_records if r.get("kind") == kind), None) for kind in BASELINES}
    result = []
    for subject in (r for r in group_records if r.get("kind") == "blockllm"):
        sparsity = subject.get("sparsity")
        note = None
        if sparsity is None:
            note = f"the run used the default blockllm_sparsity; the goals are stated at {GOAL_SPARSITY}"
        elif not math.isclose(float(sparsity), GOAL_SPARSITY):
            note = f"the run used blockllm_sparsity {sparsity}; the goals are stated at {GOAL_SPARSITY}"
        full, badam, galore, lora = first["full"], first["badam"], first["galore"], first["lora"]
        listed = [
            _compare(
                f"optimizer-state bytes <= {SHARE_OF_FULL} x full AdamW's",
                subject,
                "optimizer_state_bytes",
                [("full", full)],
                SHARE_OF_FULL,
                strict=False,
            ),
            _compare(
                "optimizer-state bytes below BAdam's and GaLore's",
                subject,
                "optimizer_state_bytes",
                [("badam", badam), ("galore", galore)],
                1.0,
                strict=True,
            ),
            _compare(
                f"gradient bytes <= {SHARE_OF_FULL} x full fine-tuning's",
                subject,
                "gradient_bytes",
                [("full", full)],
                SHARE_OF_FULL,
                strict=False,
            ),
            _compare(
                "gradient bytes below BAdam's and GaLore's",
                subject,
                "gradient_bytes",
                [("badam", badam), ("galore", galore)],
                1.0,
                strict=True,
            ),
            _compare(
                "peak memory the lowest of the five",
                subject,
                "peak_memory_bytes",
                [(kind, first[kind]) for kind in BASELINES],
                1.0,
                strict=True,
            ),
            _compare(
                f"step time <= {STEP_TIME_SHARE_OF_FULL} x full fine-tuning's",
                subject,
                "step_time_s",
                [("full", full)],
                STEP_TIME_SHARE_OF_FULL,
                strict=False,
            ),
            _compare(
                f"step time <= {STEP_TIME_SHARE_OF_BADAM} x BAdam's",
                subject,
                "step_time_s",
                [("badam", badam)],
                STEP_TIME_SHARE_OF_BADAM,
                strict=False,
            ),
            _compare(
                "final train loss at or below BAdam's, GaLore's and LoRA's",
                subject,
                "final_train_loss",
                [("badam", badam), ("galore", galore), ("lora", lora)],
                1.0,
                strict=False,
            ),
            _compare(
                "eval loss at or below BAdam's, GaLore's and LoRA's",
                subject,
                "eval_loss",
                [("badam", badam), ("galore", galore), ("lora", lora)],
                1.0,
                strict=False,
            ),
        ]
        result.append((subject, listed, note))
    return result


def group_runs(runs: list[dict]) -> dict[str | None, list[dict]]:
    """Runs by group (model size, ...), in suite order; one group ``None`` for a suite without groups."""
    grouped: dict[str | None, list[dict]] = {}
    for record in runs:
        grouped.setdefault(record.get("group"), []).append(record)
    return grouped


def _table(records: list[dict]) -> list[str]:
    full = next((r for r in records if r.get("kind") == "full" and r.get("status") == "ok"), None)
    ref = full or {}
    lines = [
        "| run | method | status | peak memory | x full | weights | gradients | x full | optimizer states "
        "| x full | master weights | trainable params | step time (median) | x full | step CPU time | tokens/s "
        "| final train loss | eval loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        trainable = r.get("trainable_parameters")
        total = r.get("total_parameters")
        share = f" ({trainable / total:.1%})" if isinstance(trainable, int) and total else ""
        step = r.get("step_time_s")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    r.get("kind") or "",
                    r["status"],
                    human_bytes(r.get("peak_memory_bytes")),
                    _ratio(r.get("peak_memory_bytes"), ref.get("peak_memory_bytes")),
                    human_bytes(r.get("parameter_bytes")),
                    human_bytes(r.get("gradient_bytes")),
                    _ratio(r.get("gradient_bytes"), ref.get("gradient_bytes")),
                    human_bytes(r.get("optimizer_state_bytes")),
                    _ratio(r.get("optimizer_state_bytes"), ref.get("optimizer_state_bytes")),
                    human_bytes(r.get("master_weight_bytes")),
                    f"{trainable:,}{share}" if isinstance(trainable, int) else "n/a",
                    f"{step:.3f} s" if isinstance(step, (int, float)) else "n/a",
                    _ratio(step, ref.get("step_time_s")),
                    _fmt("step_cpu_time_s", r.get("step_cpu_time_s")),
                    f"{r['tokens_per_s']:,.0f}" if isinstance(r.get("tokens_per_s"), (int, float)) else "n/a",
                    _number(r.get("final_train_loss")),
                    _number(r.get("eval_loss")),
                ]
            )
            + " |"
        )
    if full is None:
        lines.append("")
        lines.append("No completed full fine-tuning run in this group: the `x full` ratios are n/a.")
    return lines


def markdown(document: dict) -> str:
    machine = document.get("machine", {})
    runs = document.get("runs", [])
    sources = machine.get("peak_memory_sources") or []
    lines = [f"# Benchmark: {Path(document.get('suite') or 'suite').name}", ""]
    if document.get("description"):
        lines += [document["description"], ""]
    if document.get("command"):
        lines += ["Command:", "", "```", document["command"], "```", ""]
    versions = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items() if v)
    memory = machine.get("memory_bytes")
    lines += [
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPU cores, "
        f"{human_bytes(memory)} memory; devices: {', '.join(machine.get('devices') or []) or 'none finished'}; "
        f"{machine.get('platform')}, Python {machine.get('python')}.",
        "",
        f"Versions: {versions}.",
        "",
    ]
    if "cpu_peak_rss" in sources:
        lines += [
            "Peak memory on CPU is the training process's peak RSS (`ru_maxrss`): it includes the Python runtime and "
            "the libraries, so it differs between methods by much less than the tensors do; the categories "
            "(weights, gradients, optimizer states, master weights) are the live tensors measured inside the run.",
            "",
        ]
    if "cuda_max_memory_allocated" in sources:
        lines += ["Peak memory on GPU is `torch.cuda.max_memory_allocated` from the start of training.", ""]
    loads = [max(r["load_average"]) for r in runs if r.get("status") == "ok" and r.get("load_average")]
    cores = machine.get("cpu_count") or 1
    if loads and max(loads) > cores:
        lines += [
            f"**The machine was busy during these runs** (1-minute load average up to {max(loads):.1f} on {cores} "
            "cores): wall-clock step times and tokens/s are not comparable across runs. The step CPU time (CPU "
            "seconds of the training process per step, median) is less affected.",
            "",
        ]
    lines += [
        "Byte figures are peaks of live tensors (storages counted once), sampled after each gradient "
        "accumulation and around every optimizer step; step time is the median; final train loss is the mean "
        "logged loss over the last 10% of the steps. See docs/benchmarks.md.",
        "",
    ]
    for group, records in group_runs(runs).items():
        lines += [f"## Results{f' ({group})' if group else ''}", ""] + _table(records) + [""]
        graded = goals(records)
        lines += [f"### Goals{f' ({group})' if group else ''}", ""]
        if not graded:
            lines += ["No BlockLLM run in this group, so the goals were not measured.", ""]
        for subject, listed, note in graded:
            met = sum(goal.status == "met" for goal in listed)
            missed = sum(goal.status == "missed" for goal in listed)
            lines.append(
                f"{subject['name']}: {met} of {len(listed)} goals met, {missed} missed, "
                f"{len(listed) - met - missed} not measured."
            )
            if note:
                lines.append(f"Note: {note}.")
            lines.append("")
            for goal in listed:
                lines.append(f"- **{goal.status.upper()}**: {goal.text}. {goal.detail}.")
            lines.append("")
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['name']}: {r.get('error')} (log: `{r.get('log')}`)" for r in failed]
        lines.append("")
    lines += [
        "Plots: `loss.png` (training loss per step, evaluation loss as markers), `memory.png` (peak memory "
        "split into weights, gradients, optimizer states, master weights and other).",
        "",
    ]
    return "\n".join(lines)


def write_all(document: dict, out: Path) -> None:
    from . import plots

    write_json(out / "report.json", document)
    write_text(out / "report.md", markdown(document))
    plots.loss_plot(document["runs"], out / "loss.png")
    plots.memory_plot(document["runs"], out / "memory.png")

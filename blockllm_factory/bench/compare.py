"""The ``compare`` sub-command: the finished runs of several report folders in one set of tables, training nothing.

A variant of a method is usually run into a folder of its own (``--set blockllm_coverage=4 --out .../coverage4``), and
a suite's sweep may be spread over several folders. A folder's report covers its own runs only, and a run copied into
another folder is trained again there (its fingerprint holds the folder's model path). ``compare`` reads the runs'
``result.json`` from each folder as they are and writes: every run; each configuration over its seeds; each variant
at its best rate; the variants' ranking at every evaluation step (is it the same in the middle of the run as at its
end?); and, with ``--baseline``, each variant minus the baseline seed by seed. ``DIR=LABEL`` names a folder's
variant: its runs are listed as ``METHOD [LABEL]``.

The best rate of a variant is chosen as the suite's report chooses it (:func:`.summary.summarize`): the lowest mean
eval loss among its configurations measured on the most seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from .summary import summarize, values_label

HELP = "tables over the finished runs of several bench report folders (every run, best rates, ranking, differences)"


class CompareError(ValueError):
    """A folder or baseline that cannot be compared; the message names it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folders",
        nargs="+",
        metavar="DIR[=LABEL]",
        help="a bench report folder (its runs/**/result.json are read); =LABEL names the variant its runs are (a "
        "folder of one method's runs)",
    )
    parser.add_argument(
        "--baseline",
        metavar="VARIANT",
        help="subtract this variant's loss at its best rate from every other variant's, seed by seed (a method's "
        "name or a folder's label)",
    )
    parser.add_argument("--out", metavar="FILE", help="write the tables to FILE (markdown) instead of printing them")


def run(args: argparse.Namespace) -> int:
    try:
        runs = collect([parse_folder(text) for text in args.folders], sys.stderr)
        text = markdown(runs, baseline=args.baseline)
    except CompareError as error:
        print(f"blockllm-factory compare: {error}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"[compare] {len(runs)} runs -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def parse_folder(text: str) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR=LABEL``."""
    folder, _, label = text.partition("=")
    return Path(folder), (label or None)


def collect(folders: list[tuple[Path, str | None]], stream) -> list[dict[str, Any]]:
    """The finished runs (status ok) of every folder, each with ``variant`` set; a run met twice (same variant,
    configuration and seed) is taken from the first folder, and the duplicate is named on ``stream``."""
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], Path] = {}
    for folder, label in folders:
        if not (folder / "runs").is_dir():
            raise CompareError(f"{str(folder)!r} is not a bench report folder (it has no runs/ folder)")
        found = sorted((folder / "runs").glob("**/result.json"))
        if not found:
            raise CompareError(f"{str(folder)!r} holds no finished run (no runs/**/result.json)")
        methods: set[str] = set()
        for path in found:
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue  # a rerun's set-aside earlier attempt (.seed=N.previous)
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("status") != "ok" or not isinstance(record.get("eval_loss"), (int, float)):
                print(f"[compare] left out {path} (status {record.get('status')!r})", file=stream)
                continue
            method = record.get("method") or record["name"].split("/")[0]
            methods.add(method)
            variant = label or method
            key = (variant, record["name"])
            if key in seen:
                print(f"[compare] {variant} {record['name']}: taken from {seen[key]}, not {folder}", file=stream)
                continue
            seen[key] = folder
            runs.append({**record, "method": variant, "group": None, "config": f"{variant}/{_config(record)}"})
        if label and len(methods) > 1:
            raise CompareError(
                f"{str(folder)!r}={label}: the folder holds runs of several methods ({', '.join(sorted(methods))}); a "
                "label names the variant of one method's runs: leave this folder unlabelled"
            )
    return runs


def _config(record: dict[str, Any]) -> str:
    return values_label(record.get("sweep")) or "-"


def _curve(record: dict[str, Any]) -> dict[int, float]:
    """Eval loss by step (the last evaluation at a step counts: the final one repeats the last step's)."""
    return {int(step): float(loss) for step, loss in record.get("eval_curve") or []}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def _signed(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"mean {statistics.fmean(values):+.4f} ± {statistics.stdev(values):.4f}"


def _mib(value: Any) -> str:
    return f"{value / 2**20:,.1f} MiB" if isinstance(value, (int, float)) else "n/a"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _steps(runs: list[dict[str, Any]]) -> list[int]:
    return sorted({step for record in runs for step in _curve(record)})


def best_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each variant's runs at its best configuration, by seed order, in the order the variants first appear."""
    chosen = {}
    for summary in summarize(runs):
        config = next(p["config"] for p in summary["points"] if p["sweep"] == summary["best"])
        chosen[summary["method"]] = sorted(
            (r for r in runs if r["config"] == config), key=lambda record: record.get("seed") or 0
        )
    return chosen


def markdown(runs: list[dict[str, Any]], baseline: str | None = None) -> str:
    if not runs:
        raise CompareError("no finished run to compare")
    steps = _steps(runs)
    best = best_runs(runs)
    if baseline is not None and baseline not in best:
        raise CompareError(f"--baseline {baseline!r}: no such variant (variants: {', '.join(best)})")
    lines = ["# Runs compared", ""]
    lines += _every_run(runs, steps) + [""]
    lines += _configurations(runs) + [""]
    lines += _best(best, steps) + [""]
    lines += _ranking(best, steps) + [""]
    if baseline is not None:
        lines += _differences(best, baseline, steps) + [""]
    return "\n".join(lines)


def _every_run(runs: list[dict[str, Any]], steps: list[int]) -> list[str]:
    rows = []
    for record in sorted(runs, key=lambda r: (r["method"], r.get("sweep", {}).get("learning_rate", 0), r["seed"])):
        curve = _curve(record)
        rows.append(
            [
                record["method"],
                _config(record),
                record.get("seed"),
                *(f"{curve[step]:.4f}" if step in curve else "" for step in steps),
                f"{record['eval_exact_match']:.3f}" if record.get("eval_exact_match") is not None else "n/a",
                _mib(record.get("peak_tracked_bytes")),
                record.get("trains") or "n/a",
            ]
        )
    header = ["variant", "values", "seed", *(f"eval loss, step {step}" for step in steps)]
    return ["## Every run", ""] + _table(header + ["exact match", "peak tracked", "trains"], rows)


def _configurations(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for summary in summarize(runs):
        for point in summary["points"]:
            members = [r for r in runs if r["config"] == point["config"]]
            rows.append(
                [
                    summary["method"],
                    values_label(point["sweep"]) or "-",
                    ", ".join(str(r["seed"]) for r in members),
                    _spread([r["eval_loss"] for r in members]),
                    "**best**" if point["sweep"] == summary["best"] else "",
                ]
            )
    header = ["variant", "values", "seeds", "eval loss, end (mean ± std [min, max])"]
    return ["## Each configuration over its seeds", ""] + _table(header + ["best"], rows)


def _best(best: dict[str, list[dict[str, Any]]], steps: list[int]) -> list[str]:
    rows = []
    for variant, members in best.items():
        matches = [r["eval_exact_match"] for r in members if r.get("eval_exact_match") is not None]
        at_steps = []
        for step in steps[:-1]:
            values = [_curve(r)[step] for r in members if step in _curve(r)]
            at_steps.append(_spread(values) if values else "")
        rows.append(
            [
                variant,
                _config(members[0]),
                ", ".join(str(r["seed"]) for r in members),
                _spread([r["eval_loss"] for r in members]),
                *at_steps,
                _spread(matches) if matches else "n/a",
                _mib(statistics.fmean(r["peak_tracked_bytes"] for r in members)),
                members[0].get("trains") or "n/a",
            ]
        )
    header = ["variant", "best", "seeds", "eval loss, end (mean ± std [min, max])"]
    header += [f"eval loss, step {step}" for step in steps[:-1]]
    header += ["exact match, end", "peak tracked", "trains"]
    return ["## Each variant at its best configuration", ""] + _table(header, rows)


def ranking(best: dict[str, list[dict[str, Any]]], step: int) -> list[tuple[str, float]]:
    """The variants by mean eval loss at ``step`` over their best configuration's seeds (those evaluated there)."""
    means = []
    for variant, members in best.items():
        values = [_curve(r)[step] for r in members if step in _curve(r)]
        if values:
            means.append((variant, statistics.fmean(values)))
    return sorted(means, key=lambda item: item[1])


def _ranking(best: dict[str, list[dict[str, Any]]], steps: list[int]) -> list[str]:
    lines = ["## Ranking at each evaluation (mean eval loss of each variant's best configuration)", ""]
    orders = {}
    for step in steps:
        order = ranking(best, step)
        orders[step] = [variant for variant, _ in order]
        lines.append(f"- step {step}: " + " < ".join(f"{variant} {loss:.4f}" for variant, loss in order))
    if len(steps) > 1:
        last = orders[steps[-1]]
        changed = [step for step in steps[:-1] if orders[step] != [v for v in last if v in orders[step]]]
        lines.append(
            "- the order at the end is the order at every earlier evaluation"
            if not changed
            else f"- the order at the end differs from the order at step{'s' if len(changed) > 1 else ''} "
            f"{', '.join(map(str, changed))}"
        )
    return lines


def differences(best: dict[str, list[dict[str, Any]]], baseline: str, step: int | None = None) -> dict[str, dict]:
    """Each variant's eval loss minus the baseline's on the same seed (at ``step``, else at the end), over the seeds
    both have: ``{variant: {"seeds": [...], "differences": [...]}}``."""

    def loss(record: dict[str, Any]) -> float | None:
        return record["eval_loss"] if step is None else _curve(record).get(step)

    reference = {r["seed"]: loss(r) for r in best[baseline]}
    result = {}
    for variant, members in best.items():
        if variant == baseline:
            continue
        pairs = [
            (r["seed"], loss(r) - reference[r["seed"]])
            for r in members
            if reference.get(r["seed"]) is not None and loss(r) is not None
        ]
        if pairs:
            result[variant] = {"seeds": [s for s, _ in pairs], "differences": [d for _, d in pairs]}
    return result


def _differences(best: dict[str, list[dict[str, Any]]], baseline: str, steps: list[int]) -> list[str]:
    rows = []
    at = [differences(best, baseline, step) for step in steps[:-1]] + [differences(best, baseline)]
    for variant in best:
        if variant == baseline or variant not in at[-1]:
            continue
        cells = []
        for found in at:
            entry = found.get(variant)
            cells.append(
                f"{', '.join(f'{d:+.4f}' for d in entry['differences'])} ({_signed(entry['differences'])})"
                if entry
                else ""
            )
        rows.append([variant, _config(best[variant][0]), ", ".join(map(str, at[-1][variant]["seeds"])), *cells])
    header = ["variant", "best", "seeds", *(f"minus {baseline}, step {step}" for step in steps[:-1])]
    header.append(f"minus {baseline}, end (per seed)")
    title = f"## Each variant minus {baseline} ({_config(best[baseline][0])}), seed by seed"
    return [title, ""] + _table(header, rows)

"""Runs of a suite summarised per method: :func:`summarize` and the helpers that the report and the plots share.

Runs that differ only in their seed are one *configuration*; the configurations of a method differ in the values of
its sweep. :func:`summarize` gives one record per method of a group: its best configuration (lowest mean eval loss)
with mean, standard deviation, minimum and maximum of the losses over the seeds, and every configuration beside it.
Read by :mod:`.report` (tables, goals) and :mod:`.plots`, which do not import each other.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

OK_STATUSES = ("ok", "out of memory")  # results; "failed" is not one
LOSS_KEYS = ("final_train_loss", "eval_loss")
STAT_KEYS = (*LOSS_KEYS, "eval_exact_match")  # given with their spread over the seeds
MEAN_KEYS = (
    "peak_memory_bytes",
    "peak_tracked_bytes",
    "peak_storage_bytes",
    "untracked_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "master_weight_bytes",
    "floor_bytes",
    "trainable_parameters",
    "eligible_parameters",
    "total_parameters",
    "step_time_s",
    "step_cpu_time_s",
    "tokens_per_s",
)


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _point(records: list[dict]) -> dict[str, Any]:
    """One configuration (the runs that differ only in seed): status, loss statistics and mean figures."""
    done = [r for r in records if r.get("status") == "ok"]
    statuses = {r.get("status") for r in records}
    status = "ok" if statuses == {"ok"} else "out of memory" if statuses <= set(OK_STATUSES) else "failed"
    first = records[0]
    point: dict[str, Any] = {
        "config": first.get("config") or first["name"],
        "sweep": first.get("sweep") or {},
        "runs": [r["name"] for r in records],
        "seeds": [r.get("seed") for r in records],
        "status": status,
        "ok_runs": len(done),
        "error": None if status == "ok" else next((r.get("error") for r in records if r.get("status") != "ok"), None),
    }
    for key in STAT_KEYS:
        stats = _stats([r[key] for r in done if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])])
        point[f"{key}_stats"] = stats
        point[key] = stats["mean"] if stats else None
    source = done or records
    for key in MEAN_KEYS:
        values = [r[key] for r in source if isinstance(r.get(key), (int, float))]
        point[key] = (
            (statistics.fmean(values) if key.endswith("_s") else round(statistics.fmean(values))) if values else None
        )
    trains = [r.get("trained") for r in done if r.get("trained")]
    point["trained"] = trains[0] if trains else None
    point["trains"] = trains[0]["summary"] if trains else None
    if len({t["summary"] for t in trains}) > 1:
        point["trains"] += " (differs between seeds: see report.json)"
    # A multi-process run's engine, per-rank figures and per-rank floor (issue 20's goal reads them), from its first
    # seed.
    keys = ("peak_memory_source", "optimizer", "sparsity", "floor_formula", "peak_composition", "peak_phase")
    for key in (*keys, "engine", "ranks", "rank_floor_bytes"):
        point[key] = next((r.get(key) for r in source if r.get(key) is not None), None)
    return point


def summarize(runs: list[dict]) -> list[dict]:
    """One record per method of a group, in suite order: its best configuration (lowest mean loss among the
    configurations measured on the most seeds) with its figures (means over the seeds),
    which configuration that is (``best``: the sweep values, ``best_by``: the loss it was chosen by) and ``points``,
    every configuration's summary."""
    by_method: dict[tuple[str | None, str], dict[str, list[dict]]] = {}
    for record in runs:
        method_key = (record.get("group"), record.get("method") or record["name"])
        by_method.setdefault(method_key, {}).setdefault(record.get("config") or record["name"], []).append(record)
    summaries = []
    for (group, method), configs in by_method.items():
        points = [_point(records) for records in configs.values()]
        best, best_by = None, None
        for key in LOSS_KEYS[::-1]:  # eval loss first, else the final train loss
            candidates = [p for p in points if p["status"] == "ok" and p[key] is not None]
            if candidates:
                # Among the values measured on the most seeds: in a sweep run in two phases (every value on one
                # seed, the best on more), a value's one lucky seed must not outrank the value carried on.
                most = max(p[f"{key}_stats"]["n"] for p in candidates)
                best = min((p for p in candidates if p[f"{key}_stats"]["n"] == most), key=lambda p: p[key])
                best_by = key
                break
        chosen = best or points[0]
        first = next(iter(configs.values()))[0]
        summaries.append(
            {
                **{key: value for key, value in chosen.items() if key not in ("runs", "seeds")},
                "name": f"{group}/{method}" if group else method,
                "method": method,
                "group": group,
                "kind": first.get("kind"),
                "best": chosen["sweep"] if best is not None else None,
                "best_by": best_by,
                "points": points,
            }
        )
    return summaries


def group_runs(runs: list[dict]) -> dict[str | None, list[dict]]:
    """Runs by group (model size, ...), in suite order; one group ``None`` for a suite without groups."""
    grouped: dict[str | None, list[dict]] = {}
    for record in runs:
        grouped.setdefault(record.get("group"), []).append(record)
    return grouped


def values_label(sweep: dict | None) -> str:
    """``{"learning_rate": 0.003}`` -> ``learning_rate=0.003``."""
    return ", ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in (sweep or {}).items()
    )

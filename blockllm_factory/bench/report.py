"""The report of a suite: what ``report.json`` and ``report.md`` hold (tables, ratios to full fine-tuning, goals).

Ratios and goals use the per-method records of :func:`.summary.summarize` (one per method of a group: its best
configuration, means over the seeds); a suite without seeds or sweeps has one run per record. :mod:`.runner` writes
the files beside the plots of :mod:`.plots`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .summary import OK_STATUSES, group_runs, summarize, values_label

# The goals of issue 5 (BlockLLM against the other four methods, same model and batch).
GOAL_SPARSITY = 0.95
SHARE_OF_FULL = 0.055  # optimizer-state and gradient bytes, at most this share of full fine-tuning's
STEP_TIME_SHARE_OF_FULL = 0.75
STEP_TIME_SHARE_OF_BADAM = 1.05
FLOOR_MARGIN = 1.10  # issue 9: peak tracked bytes within 10% of the floor
UNTRACKED_MARGIN = 1.10  # issue 18: bytes outside the tracked categories within 10% of LoRA's
MEMORY_SHARE_OF_FULL = 0.45  # issue 24: memory at most this share of full fine-tuning's, in the same run
GAP_SHARE_OF_LORA = 1 / 3  # issue 24: gap to full fine-tuning at most this share of LoRA's gap
BASELINES = ("full", "lora", "galore", "badam")
# The full-parameter methods; each kind's first method in a suite is the reference, so a suite lists a method as
# LLaMA-Factory ships it (e.g. BAdam without the frozen-layer checkpointing) before its variants.
FULL_PARAMETER_KINDS = ("full", "galore", "apollo", "badam")
OTHERS = "others"  # as a goal's reference: the first method of every other kind in the group
FLOOR = "floor"  # as a goal's reference: the subject's own floor (floor_bytes)
# LLaMA-Factory `optim` names that give BlockLLM 8-bit moments (patches/precision.py).
EIGHT_BIT_OPTIMS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class GoalSpec:
    """``subject[key] (<|<=) factor x reference[reference_key or key]`` for every reference.

    A reference is a kind (the group's first method of that kind), :data:`OTHERS` (the first method of every kind but
    the subject's) or :data:`FLOOR` (the subject's own ``floor_bytes``)."""

    text: str
    key: str
    references: tuple[str, ...]
    factor: float = 1.0
    strict: bool = False
    reference_key: str | None = None
    # A goal that is not `subject <= factor x reference`: check(subject, references) gives its status and detail.
    check: Callable[[dict, list[tuple[str, dict | None]]], tuple[str, str]] | None = None


def _mean_std(record: dict | None, key: str) -> tuple[float, float] | None:
    """Mean and standard deviation over the seeds (0 for a single run) of a completed record's ``key``."""
    if not _usable(record, key):
        return None
    stats = record.get(f"{key}_stats") or {}
    return float(record[key]), float(stats.get("std") or 0.0)


def _missing(label: str, reference: dict | None, key: str) -> str:
    return f"{label}: " + ("not in the suite" if reference is None else f"{reference['name']} has no {key}")


def _below_beyond_spread(subject: dict, references: list[tuple[str, dict | None]]) -> tuple[str, str]:
    """The subject's mean eval loss + its std at or below every reference's mean - std: lower by more than the spread
    of the seeds on both sides."""
    mine = _mean_std(subject, "eval_loss")
    if mine is None:
        return "not measured", f"{subject['name']} has no eval_loss ({subject.get('status')})"
    upper = mine[0] + mine[1]
    parts, failed, missing = [f"{subject['name']} {mine[0]:.4f} ± {mine[1]:.4f}"], False, not references
    for label, reference in references:
        theirs = _mean_std(reference, "eval_loss")
        if theirs is None:
            missing = True
            parts.append(_missing(label, reference, "eval_loss"))
            continue
        lower = theirs[0] - theirs[1]
        holds = upper <= lower
        failed |= not holds
        verdict = f"{upper:.4f} <= {lower:.4f}, holds" if holds else f"{upper:.4f} > {lower:.4f}, does not hold"
        parts.append(f"{label} {theirs[0]:.4f} ± {theirs[1]:.4f} ({verdict})")
    return ("missed" if failed else "not measured" if missing else "met"), "; ".join(parts)


def _gap_to_full(subject: dict, references: list[tuple[str, dict | None]]) -> tuple[str, str]:
    """Mean eval loss gap to full fine-tuning at most GAP_SHARE_OF_LORA x LoRA's gap, or within the two std's."""
    figures = {"subject": _mean_std(subject, "eval_loss")}
    figures.update({label: _mean_std(reference, "eval_loss") for label, reference in references})
    absent = [_missing(label, ref, "eval_loss") for label, ref in references if figures[label] is None]
    if figures["subject"] is None or absent:
        return "not measured", "; ".join(absent) or f"{subject['name']} has no eval_loss"
    (mean, std), (full, full_std), (lora, _) = figures["subject"], figures["full"], figures["lora"]
    gap, lora_gap = mean - full, lora - full
    within = abs(gap) <= std + full_std
    holds = gap <= GAP_SHARE_OF_LORA * lora_gap or within
    detail = (
        f"{subject['name']} {mean:.4f}, full {full:.4f}: gap {gap:+.4f}; LoRA's gap {lora_gap:+.4f}, "
        f"{GAP_SHARE_OF_LORA:.3g} of it {GAP_SHARE_OF_LORA * lora_gap:+.4f}; spread of the two {std + full_std:.4f} "
        f"({'holds' if holds else 'does not hold'})"
    )
    return ("met" if holds else "missed"), detail


def _zero3_rank_peak(subject: dict, references: list[tuple[str, dict | None]]) -> tuple[str, str]:
    """Issue 20, under ZeRO-3: every rank's all-storage peak at or below the reference's (BAdam's, at the same number
    of processes) and within FLOOR_MARGIN of the rank's floor counted as the issue counts it: the per-rank target
    (:func:`rank_targets`, one gathered layer included) plus the activations and the loss path measured at that rank's
    peak."""
    engine = subject.get("engine") or {}
    if engine.get("kind") != "deepspeed" or engine.get("zero_stage") != 3 or not subject.get("ranks"):
        return "not measured", f"{subject['name']} is not a measured ZeRO-3 run"
    label, reference = references[0]
    theirs = (reference or {}).get("ranks") or []
    if not theirs or (reference.get("engine") or {}).get("world_size") != engine.get("world_size"):
        return "not measured", _missing(label, reference, "per-rank figures at the same number of processes")
    if not subject.get("rank_floor_bytes"):
        return "not measured", f"{subject['name']} has no per-rank floor"
    mine = max(rank["peak_storage_bytes"] for rank in subject["ranks"])
    their_peak = max(rank["peak_storage_bytes"] for rank in theirs)
    # rank -> (its peak, its floor with the activations and loss path measured at that peak)
    floors = {
        rank["rank"]: (
            rank["peak_storage_bytes"],
            subject["rank_floor_bytes"]
            + sum((rank.get("peak_composition") or {}).get(key, 0) for key in ("activations", "loss_path")),
        )
        for rank in subject["ranks"]
    }
    below = mine <= their_peak
    near = all(peak <= FLOOR_MARGIN * floor for peak, floor in floors.values())
    detail = (
        f"{subject['name']} {human_bytes(mine)}; {label} {human_bytes(their_peak)} "
        f"({'holds' if below else 'does not hold'}); floor with the activations measured at the peak, per rank: "
        + ", ".join(
            f"rank {rank} {human_bytes(floor)} ({peak / floor:.3f} x)" for rank, (peak, floor) in floors.items()
        )
        + f" ({'holds' if near else 'does not hold'}: at most {FLOOR_MARGIN:.2f} x)"
    )
    return ("met" if below and near else "missed"), detail


# Every goal a suite may list under `goals:`; the first nine, issue 5's, are graded when it lists none.
GOALS: dict[str, GoalSpec] = {
    "state_share_of_full": GoalSpec(
        f"optimizer-state bytes <= {SHARE_OF_FULL} x full AdamW's", "optimizer_state_bytes", ("full",), SHARE_OF_FULL
    ),
    "state_below_badam_galore": GoalSpec(
        "optimizer-state bytes below BAdam's and GaLore's", "optimizer_state_bytes", ("badam", "galore"), strict=True
    ),
    "gradient_share_of_full": GoalSpec(
        f"gradient bytes <= {SHARE_OF_FULL} x full fine-tuning's", "gradient_bytes", ("full",), SHARE_OF_FULL
    ),
    "gradient_below_badam_galore": GoalSpec(
        "gradient bytes below BAdam's and GaLore's", "gradient_bytes", ("badam", "galore"), strict=True
    ),
    "peak_lowest": GoalSpec("peak memory the lowest of the five", "peak_memory_bytes", BASELINES, strict=True),
    "step_time_share_of_full": GoalSpec(
        f"step time <= {STEP_TIME_SHARE_OF_FULL} x full fine-tuning's",
        "step_time_s",
        ("full",),
        STEP_TIME_SHARE_OF_FULL,
    ),
    "step_time_share_of_badam": GoalSpec(
        f"step time <= {STEP_TIME_SHARE_OF_BADAM} x BAdam's", "step_time_s", ("badam",), STEP_TIME_SHARE_OF_BADAM
    ),
    "train_loss_at_or_below_baselines": GoalSpec(
        "final train loss at or below BAdam's, GaLore's and LoRA's", "final_train_loss", ("badam", "galore", "lora")
    ),
    "eval_loss_at_or_below_baselines": GoalSpec(
        "eval loss at or below BAdam's, GaLore's and LoRA's", "eval_loss", ("badam", "galore", "lora")
    ),
    "peak_at_or_below_others": GoalSpec(
        "peak memory at or below every other method's", "peak_memory_bytes", (OTHERS,)
    ),
    "peak_tracked_lowest": GoalSpec(
        "peak tracked bytes the lowest of all methods", "peak_tracked_bytes", (OTHERS,), strict=True
    ),
    "peak_tracked_near_floor": GoalSpec(
        f"peak tracked bytes within {FLOOR_MARGIN - 1:.0%} of the floor",
        "peak_tracked_bytes",
        (FLOOR,),
        FLOOR_MARGIN,
        reference_key="floor_bytes",
    ),
    "storage_peak_lowest_of_full_parameter": GoalSpec(
        "all-storage peak the lowest of the full-parameter methods as LLaMA-Factory ships them",
        "peak_storage_bytes",
        FULL_PARAMETER_KINDS,
        strict=True,
    ),
    "untracked_near_lora": GoalSpec(
        f"bytes outside the tracked categories (at the all-storage peak) within {UNTRACKED_MARGIN - 1:.0%} of LoRA's",
        "untracked_bytes",
        ("lora",),
        UNTRACKED_MARGIN,
    ),
    "eval_loss_at_or_below_lora_badam": GoalSpec(
        "mean eval loss at or below LoRA's and BAdam's", "eval_loss", ("lora", "badam")
    ),
    "train_loss_at_or_below_lora_badam": GoalSpec(
        "mean final train loss at or below LoRA's and BAdam's", "final_train_loss", ("lora", "badam")
    ),
    # Issue 24 (a real pretrained model): spreads over the seeds decide, memory from the same run.
    "eval_loss_below_lora_badam_apollo_beyond_spread": GoalSpec(
        "mean eval loss below LoRA's, BAdam's and APOLLO's by more than the seeds' spread (mean + std <= mean - std)",
        "eval_loss",
        ("lora", "badam", "apollo"),
        check=_below_beyond_spread,
    ),
    "eval_gap_to_full_third_of_lora": GoalSpec(
        f"gap to full fine-tuning's mean eval loss at most {GAP_SHARE_OF_LORA:.2g} of LoRA's gap, or within the "
        "seeds' spread of full",
        "eval_loss",
        ("full", "lora"),
        check=_gap_to_full,
    ),
    "peak_tracked_share_of_full": GoalSpec(
        f"peak tracked bytes (live tensors) <= {MEMORY_SHARE_OF_FULL} x full fine-tuning's",
        "peak_tracked_bytes",
        ("full",),
        MEMORY_SHARE_OF_FULL,
    ),
    "peak_share_of_full": GoalSpec(
        f"peak memory <= {MEMORY_SHARE_OF_FULL} x full fine-tuning's (on CPU the process's peak RSS)",
        "peak_memory_bytes",
        ("full",),
        MEMORY_SHARE_OF_FULL,
    ),
    # Issue 20: ZeRO-3 at BlockLLM's budget.
    "zero3_rank_peak_at_or_below_badam_near_floor": GoalSpec(
        f"under ZeRO-3, each rank's all-storage peak at or below BAdam's at the same number of processes, and within "
        f"{FLOOR_MARGIN - 1:.0%} of the per-rank floor (with one gathered layer and the activations measured at the "
        "peak)",
        "peak_storage_bytes",
        ("badam",),
        check=_zero3_rank_peak,
    ),
}
DEFAULT_GOALS = tuple(GOALS)[:9]


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


# ---------------------------------------------------------------- floor


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def floor(record: dict, args: dict[str, Any]) -> tuple[int, str] | None:
    """BlockLLM's memory floor for a run, and the formula with its figures; None for other kinds or missing figures.

    Weights at their bytes per parameter (2 under bf16/fp16/pure_bf16, else 4) x all parameters, plus (1 - sparsity)
    x (in half precision only a master: 4 B fp32, or 2 B with ``blockllm_master: compensated`` + 8 B Adam moments, 2 B
    when 8-bit + a gradient at the weights' bytes) per eligible parameter. A target beside the measured figures, never
    in place of them."""
    terms = _floor(record, args)
    return terms[:2] if terms else None


def _floor(
    record: dict, args: dict[str, Any], weights_split: int = 1, selection_split: int = 1, deepspeed: bool = False
) -> tuple[int, str, float] | None:
    """:func:`floor`'s bytes and formula, with the weights and the selection's states divided among the processes that
    split them, and under DeepSpeed its fp32 partition as the master (4 B); also the selection's coordinates."""
    total, eligible, sparsity = (record.get(key) for key in ("total_parameters", "eligible_parameters", "sparsity"))
    if record.get("kind") != "blockllm" or not all(isinstance(v, (int, float)) for v in (total, eligible, sparsity)):
        return None
    half = any(_true(args.get(key)) for key in ("bf16", "fp16", "pure_bf16"))
    weight = 2 if half else 4
    master = 4 if deepspeed else ((2 if args.get("blockllm_master") == "compensated" else 4) if half else 0)
    moments = 2 if str(args.get("optim", "")) in EIGHT_BIT_OPTIMS else 8
    per_selected = master + moments + weight
    value = weight * total / weights_split + (1.0 - float(sparsity)) * per_selected * eligible / selection_split
    weights_part = f" / {weights_split}" if weights_split > 1 else ""
    selection_part = f" / {selection_split}" if selection_split > 1 else ""
    formula = (
        f"{weight} B x {total:,}{weights_part} + (1 - {sparsity:g}) x ({master} master + {moments} moments + {weight} "
        f"gradient) B x {eligible:,} eligible{selection_part}"
    )
    return int(round(value)), formula, weight


def rank_targets(record: dict, args: dict[str, Any]) -> dict[str, Any] | None:
    """BlockLLM's per-rank targets for a multi-process run (issue 20), beside the measured figures, never in place of
    them: the bytes one rank holds at BlockLLM's budget, and, under DDP, the bytes one rank sends per step when only
    the selection's gradients cross the wire. None for other kinds, one process, or missing figures.

    Per rank: :func:`floor` with the weights divided by the processes under ZeRO-3 and the selection's states by the
    processes under DeepSpeed (whose partitions split them; there the master is its fp32 partition, 4 B), and under
    ZeRO-3 one whole layer, gathered for its forward and backward (the largest, ``largest_layer_parameters``), as the
    issue counts the floor. Without activations (measured at the peak, they are added by the goal). DDP's bytes: (1 -
    sparsity) x eligible x the gradient's bytes, without the probed blocks' norms."""
    engine = record.get("engine") or {}
    world = engine.get("world_size") or 1
    deepspeed = engine.get("kind") == "deepspeed"
    weights_split = world if deepspeed and engine.get("zero_stage") == 3 else 1
    terms = _floor(record, args, weights_split, world if deepspeed else 1, deepspeed) if world > 1 else None
    if terms is None:
        return None
    value, formula, weight = terms
    layer = record.get("largest_layer_parameters")
    if weights_split > 1 and isinstance(layer, int):
        value += int(weight) * layer
        formula += f" + {weight} B x {layer:,} (one gathered layer)"
    targets: dict[str, Any] = {"rank_floor_bytes": value, "rank_floor_formula": formula}
    if engine.get("kind") == "ddp":
        sparsity, eligible = float(record["sparsity"]), record["eligible_parameters"]
        targets["collective_target_bytes"] = int(round((1.0 - sparsity) * eligible * weight))
        targets["collective_target_formula"] = f"(1 - {sparsity:g}) x {eligible:,} eligible x {weight} B gradient"
    return targets


# ---------------------------------------------------------------- what a run trains

_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|shared|embeddings)(\.|$)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)(\.|$)")
_NORM = re.compile(r"(^|\.)([^.]*norm[^.]*|ln_[^.]*)(\.|$)", re.IGNORECASE)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_ADAPTER = re.compile(r"(^|\.)(lora_[A-Za-z_]+|lora_magnitude_vector)(\.|$)")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|fc1|fc2)(\.|$)")


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[str] = []
    for number in sorted(numbers):
        if spans and number == int(spans[-1].split("-")[-1]) + 1:
            spans[-1] = f"{spans[-1].split('-')[0]}-{number}"
        else:
            spans.append(str(number))
    return ", ".join(spans)


def largest_layer(parameters: list[dict] | None) -> int | None:
    """The parameters of the largest numbered layer (``layers.<i>.``, ``h.<i>.``, ...), from the measurement callback's
    parameter list: what ZeRO-3 gathers whole for one layer's forward and backward. None without layers."""
    sizes: dict[int, int] = {}
    for entry in parameters or ():
        match = next((m for m in (_LAYER.search(name) for name in entry.get("names") or []) if m), None)
        if match is not None:
            sizes[int(match.group(1))] = sizes.get(int(match.group(1)), 0) + int(entry.get("numel") or 0)
    return max(sizes.values()) if sizes else None


def describe_trained(parameters: list[dict] | None) -> dict[str, Any] | None:
    """What a run trained, from the parameter tensors whose values changed between the start and the end of training
    (``parameters``: ``[{"names": [...], "numel": n, "changed": bool | None}]`` as the measurement callback writes;
    tied weights are one entry with several names). None when the run did not report it."""
    if not parameters:
        return None
    layer_count = 0
    changed_layers: set[int] = set()
    adapter_layers: set[int] = set()
    parts_in_layers: set[str] = set()
    counts = {"norms": [0, 0], "layer_tensors": [0, 0]}
    embeddings = head = tied = adapters = False
    changed_tensors = changed_numel = unmeasured = other = 0
    for entry in parameters:
        names = entry.get("names") or []
        changed = entry.get("changed")
        layers = {int(m.group(1)) for m in (_LAYER.search(n) for n in names) if m}
        layer_count = max([layer_count] + [index + 1 for index in layers])
        if changed is None:
            unmeasured += 1
            continue
        changed_tensors += int(changed)
        changed_numel += entry.get("numel", 0) if changed else 0
        is_embedding = any(_EMBEDDING.search(n) for n in names)
        is_head = any(_HEAD.search(n) for n in names)
        if is_embedding or is_head:
            tied |= is_embedding and is_head
            embeddings |= changed and is_embedding
            head |= changed and is_head
        elif any(_ADAPTER.search(n) for n in names):
            if changed:
                adapters = True
                adapter_layers.update(layers)
                parts_in_layers.update(_parts(names))
        elif any(_NORM.search(n) for n in names):
            counts["norms"][0] += int(changed)
            counts["norms"][1] += 1
        elif layers:
            counts["layer_tensors"][0] += int(changed)
            counts["layer_tensors"][1] += 1
            if changed:
                changed_layers.update(layers)
                parts_in_layers.update(_parts(names))
        else:
            other += int(changed)
    pieces = []
    if adapters:
        pieces.append(f"LoRA adapters on layers {_spans(list(adapter_layers))} of {layer_count}")
    if embeddings:
        pieces.append("embeddings (tied to the head)" if tied else "embeddings")
    if head and not tied:
        pieces.append("head")
    norms_changed, norms_total = counts["norms"]
    if norms_changed:
        pieces.append(f"norms ({norms_changed} of {norms_total})")
    layer_changed, layer_total = counts["layer_tensors"]
    if changed_layers:
        pieces.append(
            f"layers {_spans(list(changed_layers))} of {layer_count} ({layer_changed} of {layer_total} weight tensors)"
        )
    if other:
        pieces.append(f"{other} other tensors")
    summary = "; ".join(pieces) or "nothing changed"
    if parts_in_layers:
        summary += f" [{', '.join(sorted(parts_in_layers))}]"
    if unmeasured:
        summary += f" ({unmeasured} tensors not measured)"
    return {
        "summary": summary,
        "embeddings": embeddings,
        "head": head or (tied and embeddings),
        "norms": counts["norms"],
        "layers": sorted(changed_layers | adapter_layers),
        "layer_count": layer_count,
        "layer_tensors": counts["layer_tensors"],
        "adapters": adapters,
        "changed_tensors": changed_tensors,
        "tensors": len(parameters),
        "changed_tensor_parameters": changed_numel,
        "unmeasured_tensors": unmeasured,
    }


def _parts(names: list[str]) -> set[str]:
    found = {"attention" for n in names if _ATTENTION.search(n)} | {"MLP" for n in names if _MLP.search(n)}
    return found or {"other"}


# ---------------------------------------------------------------- goals


def _compare(subject: dict, spec: GoalSpec, references: list[tuple[str, dict | None]]) -> Goal:
    """Missed as soon as one comparison fails, met only when all of them could be made and hold."""
    key, text = spec.key, spec.text
    if not _usable(subject, key):
        return Goal(text, "not measured", f"{subject['name']} has no {key} ({subject.get('status')})")
    value = subject[key]
    reference_key = spec.reference_key or key
    parts, failed, missing = [], False, False
    for label, reference in references:
        if not _usable(reference, reference_key):
            missing = True
            why = "not in the suite" if reference is None else f"{reference['name']} {reference.get('status')}"
            if reference is not None and reference is subject:
                why = f"no {reference_key}"
            parts.append(f"{label}: {why}")
            continue
        bound = spec.factor * reference[reference_key]
        holds = value < bound if spec.strict else value <= bound
        failed |= not holds
        shown = _fmt(key, reference[reference_key])
        scaled = f"{spec.factor:g} x {shown} = {_fmt(key, bound)}" if spec.factor != 1 else _fmt(key, bound)
        parts.append(f"{label} {scaled} ({'holds' if holds else 'does not hold'})")
    if not references:
        missing = True
        parts.append("no other method in the group")
    status = "missed" if failed else "not measured" if missing else "met"
    return Goal(text, status, f"{subject['name']} {_fmt(key, value)}; " + "; ".join(parts))


def goals(
    group_records: list[dict], names: list[str] | tuple[str, ...] | None = None
) -> list[tuple[dict, list[Goal], str | None]]:
    """For every BlockLLM record of a group: its goals (``names`` from :data:`GOALS`, default :data:`DEFAULT_GOALS`)
    and a note on the sparsity it ran at."""
    kinds = list(dict.fromkeys(r.get("kind") for r in group_records))
    first = {kind: next((r for r in group_records if r.get("kind") == kind), None) for kind in kinds + list(BASELINES)}
    result = []
    for subject in (r for r in group_records if r.get("kind") == "blockllm"):
        sparsity = subject.get("sparsity")
        note = None
        if sparsity is None:
            note = f"the run used the default blockllm_sparsity; the goals are stated at {GOAL_SPARSITY}"
        elif not math.isclose(float(sparsity), GOAL_SPARSITY):
            note = f"the run used blockllm_sparsity {sparsity}; the goals are stated at {GOAL_SPARSITY}"
        listed = []
        for name in names or DEFAULT_GOALS:
            spec = GOALS[name]
            references: list[tuple[str, dict | None]] = []
            for reference in spec.references:
                if reference == FLOOR:
                    references.append(("floor", subject))
                elif reference == OTHERS:
                    references += [(kind, first[kind]) for kind in kinds if kind != "blockllm"]
                else:
                    references.append((reference, first.get(reference)))
            if spec.check is not None:
                listed.append(Goal(spec.text, *spec.check(subject, references)))
            else:
                listed.append(_compare(subject, spec, references))
        result.append((subject, listed, note))
    return result


# ---------------------------------------------------------------- markdown


def _table(records: list[dict], reference: dict | None) -> list[str]:
    ref = reference or {}
    lines = [
        "| run | method | status | peak memory | x full | weights | gradients | x full | optimizer states "
        "| x full | master weights | peak tracked | floor | x floor | trainable params | step time (median) | x full "
        "| step CPU time | tokens/s | final train loss | eval loss |",
        "|---|---|---|" + "---:|" * 18,
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
                    human_bytes(r.get("peak_tracked_bytes")),
                    human_bytes(r.get("floor_bytes")) if r.get("floor_bytes") else "",
                    _ratio(r.get("peak_tracked_bytes"), r.get("floor_bytes")) if r.get("floor_bytes") else "",
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
    if reference is None:
        lines.append("")
        lines.append("No completed full fine-tuning run in this group: the `x full` ratios are n/a.")
    return lines


def _storage_table(records: list[dict]) -> list[str]:
    """Every byte: the all-storage peak, the tracked and untracked bytes at that moment, its composition, where."""
    from blockllm_factory.patches.storages import CATEGORIES  # noqa: PLC0415 - the names the callback writes

    lines = [
        "| run | all-storage peak | tracked at it | untracked | "
        + " | ".join(key.replace("_", " ") for key in CATEGORIES)
        + " | where | floor |",
        "|---|" + "---:|" * (len(CATEGORIES) + 3) + "---|---:|",
    ]
    for r in records:
        parts = r.get("peak_composition") or {}
        peak, untracked = r.get("peak_storage_bytes"), r.get("untracked_bytes")
        tracked = peak - untracked if isinstance(peak, int) and isinstance(untracked, int) else None
        where = f"{r['peak_phase']}, step {r['peak_step']}" if r.get("peak_phase") else "n/a"
        cells = [r["name"], human_bytes(peak), human_bytes(tracked), human_bytes(untracked)]
        cells += [human_bytes(parts.get(key)) if parts else "n/a" for key in CATEGORIES]
        cells += [where, human_bytes(r.get("floor_bytes")) if r.get("floor_bytes") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rank_table(records: list[dict]) -> list[str]:
    """Multi-process runs, one row per rank: the all-storage peak and its composition, and the bytes the rank sent in
    collectives per step, beside BlockLLM's per-rank targets (:func:`rank_targets`)."""
    from blockllm_factory.patches.storages import CATEGORIES  # noqa: PLC0415 - the names the callback writes

    lines = [
        "| run | engine | rank | all-storage peak | "
        + " | ".join(key.replace("_", " ") for key in CATEGORIES)
        + " | peak from step 2"
        + " | sent per step (median) | sent per step (max) | sent by operator, whole run | floor per rank "
        "| sent target |",
        "|---|---|---:|" + "---:|" * (len(CATEGORIES) + 4) + "---|---:|---:|",
    ]
    for r in records:
        engine = r.get("engine") or {}
        name = engine.get("kind", "n/a")
        if engine.get("kind") == "deepspeed":
            name = f"ZeRO-{engine.get('zero_stage')}"
        for rank in r.get("ranks") or []:
            parts = rank.get("peak_composition") or {}
            per_step = rank.get("collective_bytes_per_step") or []
            by_op = rank.get("collective_bytes_by_op") or {}
            cells = [r["name"], f"{name} x {engine.get('world_size', '?')}", str(rank.get("rank"))]
            cells += [human_bytes(rank.get("peak_storage_bytes"))]
            cells += [human_bytes(parts.get(key)) if parts else "n/a" for key in CATEGORIES]
            cells += [
                human_bytes(rank.get("peak_storage_bytes_after_first_step")),
                human_bytes(sorted(per_step)[len(per_step) // 2]) if per_step else "n/a",
                human_bytes(max(per_step)) if per_step else "n/a",
                ", ".join(f"{op} {human_bytes(value)}" for op, value in by_op.items()) or "none",
                human_bytes(r.get("rank_floor_bytes")) if r.get("rank_floor_bytes") else "",
                human_bytes(r.get("collective_target_bytes")) if r.get("collective_target_bytes") else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


RANKS_NOTE = (
    "Each rank of a multi-process run measures itself: its all-storage peak and what made it up, and the bytes it "
    "handed to torch.distributed collectives in each optimizer step (the tensors it contributes: an all-reduce's "
    "buffer, an all-gather's or reduce-scatter's input, a broadcast's on its root; seen as `c10d` operators, DDP's "
    "C++ reducer included; the wire carries a share of it that depends on the backend's algorithm). The median is "
    "over the steps, the first (BlockLLM's probe of every block) included; peak from step 2 leaves that first step "
    "out. Floor per rank and sent target: BlockLLM's targets at its budget (issue 20), formulas beside the measured "
    "figures."
)


def _spread(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} [{stats['min']:.4f}, {stats['max']:.4f}]"


# Columns of the per-method and sweep tables: (title, right-aligned).
LOSS_SPREAD_COLUMNS = (
    ("final train loss (mean ± std [min, max])", True),
    ("eval loss (mean ± std [min, max])", True),
)
METHOD_COLUMNS = (
    ("method", False),
    ("kind", False),
    ("best value", False),
    ("runs ok", True),
    *LOSS_SPREAD_COLUMNS,
    ("eval exact match (mean ± std [min, max])", True),
    ("peak memory", True),
    ("peak tracked", True),
    ("trains (parameters that changed)", False),
)
SWEEP_COLUMNS = (
    ("method", False),
    ("values", False),
    ("status", False),
    ("runs ok", True),
    *LOSS_SPREAD_COLUMNS,
    ("best", False),
)


def _markdown_table(columns: tuple[tuple[str, bool], ...], rows: list[list[Any]]) -> list[str]:
    """A header, its alignment rule and one line per row (cells as ``str`` gives them)."""
    header = "| " + " | ".join(title for title, _ in columns) + " |"
    rule = "|" + "".join("---:|" if right else "---|" for _, right in columns)
    return [header, rule] + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]


def _loss_spreads(record: dict) -> list[str]:
    return [_spread(record.get("final_train_loss_stats")), _spread(record.get("eval_loss_stats"))]


def _method_table(summaries: list[dict]) -> list[str]:
    rows = []
    for s in summaries:
        runs = sum(len(p["runs"]) for p in s["points"])
        ok = sum(p["ok_runs"] for p in s["points"])
        best = values_label(s.get("best")) or ("-" if len(s["points"]) == 1 else "n/a")
        rows.append(
            [
                s["name"],
                s.get("kind") or "",
                best,
                f"{ok} of {runs}",
                *_loss_spreads(s),
                _spread(s.get("eval_exact_match_stats")),
                human_bytes(s.get("peak_memory_bytes")),
                human_bytes(s.get("peak_tracked_bytes")),
                s.get("trains") or "n/a",
            ]
        )
    return _markdown_table(METHOD_COLUMNS, rows)


def _sweep_table(summaries: list[dict]) -> list[str]:
    rows = []
    for s in summaries:
        for p in s["points"]:
            best = "**best**" if s.get("best") is not None and p["sweep"] == s["best"] else ""
            ok = f"{p['ok_runs']} of {len(p['runs'])}"
            rows.append([s["name"], values_label(p["sweep"]) or "-", p["status"], ok, *_loss_spreads(p), best])
    return _markdown_table(SWEEP_COLUMNS, rows)


def _gaps(summaries: list[dict]) -> list[str]:
    """BlockLLM's mean eval loss beside every other method's, with what each trains."""
    lines = []
    for subject in (s for s in summaries if s.get("kind") == "blockllm" and s.get("eval_loss") is not None):
        if not any(other.get("eval_loss") is not None for other in summaries if other is not subject):
            continue
        lines.append(
            f"- {subject['name']} mean eval loss {subject['eval_loss']:.4f} (trains: {subject.get('trains') or 'n/a'})"
        )
        for other in summaries:
            if other is subject or other.get("eval_loss") is None:
                continue
            gap = subject["eval_loss"] - other["eval_loss"]
            lines.append(
                f"  - {other['name']} {other['eval_loss']:.4f}: BlockLLM {'+' if gap >= 0 else '-'}{abs(gap):.4f} "
                f"(trains: {other.get('trains') or 'n/a'})"
            )
    return lines


STORAGE_NOTE = (
    "All-storage peak: the largest sum of every live tensor storage on the training device during training (a "
    "dispatch mode sees every operator; on a GPU what `max_memory_allocated` sees, without the allocator's "
    "rounding). Its composition at that moment: weights (and buffers), gradients, optimizer state and masters are the "
    "tracked categories; activations are storages autograd saved for backward; loss path is what the forward made "
    "from the output embedding on (logits, loss); temporaries are other storages made in forward, backward or the "
    "optimizer step; other is the rest (the batch). Where: the phase and step (1: the first) of the peak."
)


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
        f"{machine.get('platform')}, Python {machine.get('python')}."
        + (
            f" (Runs from {machine['hosts']} hosts; the first run's is shown.)"
            if (machine.get("hosts") or 1) > 1
            else ""
        ),
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
    per_gradient = not any(r.get("gradient_samples") is False for r in runs)
    sampled = (
        "sampled after each gradient accumulation and around every optimizer step"
        if per_gradient
        else "sampled around every optimizer step (not after each gradient: BLOCKLLM_FACTORY_BENCH_GRADIENT_SAMPLES=0)"
    )
    profiled = sorted({r["profiled_steps"] for r in runs if r.get("profiled_steps")})
    step_time = "step time is the median" + (
        f" of the steps before the last {profiled[-1]}, which were profiled (runs/<run>/profile.txt)"
        if profiled
        else ""
    )
    lines += [
        f"Byte figures are peaks of live tensors (storages counted once), {sampled}; "
        "peak tracked is the largest sum of the four categories at one sample; "
        "floor is BlockLLM's target (weights at their bytes per parameter x all parameters + (1 - sparsity) x "
        "(4 B master + 8 B moments, 2 B with 8-bit states + a gradient) per eligible parameter), "
        f"a formula beside the measured figures; {step_time}; "
        "final train loss is the mean logged loss over the last 10% of the steps; "
        "trains lists the parameter tensors whose values changed during the run. See docs/benchmarks.md.",
        "",
    ]
    summaries = document.get("results") or summarize(runs)
    grouped_summaries = group_runs(summaries)
    for group, records in group_runs(runs).items():
        suffix = f" ({group})" if group else ""
        methods = grouped_summaries.get(group, [])
        reference = next((s for s in methods if s.get("kind") == "full" and s.get("status") == "ok"), None)
        lines += [f"## Results{suffix}", ""] + _table(records, reference) + [""]
        if any(r.get("peak_storage_bytes") for r in records):
            lines += [f"### Every byte{suffix}", "", STORAGE_NOTE, ""] + _storage_table(records) + [""]
        if any(r.get("ranks") for r in records):
            lines += [f"### Per rank{suffix}", "", RANKS_NOTE, ""] + _rank_table(records) + [""]
            for r in records:
                for key in ("rank_floor_formula", "collective_target_formula"):
                    if r.get(key):
                        lines.append(f"- {r['name']}: {key.split('_')[0]} target {r[key]}.")
            lines.append("")
        lines += [f"### Per method{suffix}", ""]
        if any(len(s["points"]) > 1 or s["points"][0]["ok_runs"] > 1 for s in methods):
            lines += [
                "Each method at its best value (lowest mean eval loss over the seeds, among the values run on the "
                "most seeds; by final train loss where no run evaluated); figures are over the seeds of that value.",
                "",
            ]
        lines += _method_table(methods) + [""]
        if any(len(s["points"]) > 1 for s in methods):
            lines += [f"### Sweep{suffix}", ""] + _sweep_table(methods) + [""]
        graded = goals(methods, document.get("goals"))
        lines += [f"### Goals{suffix}", ""]
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
            for key in ("floor_formula",):
                if subject.get(key):
                    lines.append(f"Floor: {subject[key]} = {human_bytes(subject.get('floor_bytes'))}.")
            lines.append("")
            for goal in listed:
                lines.append(f"- **{goal.status.upper()}**: {goal.text}. {goal.detail}.")
            lines.append("")
        gaps = _gaps(methods)
        if gaps:
            lines += [f"### Eval loss gaps{suffix}", ""] + gaps + [""]
    out_of_memory = [r for r in runs if r.get("status") == "out of memory"]
    if out_of_memory:
        lines += ["## Out of memory", ""]
        lines += [
            f"- {r.get('method')} at {r.get('group') or 'the suite model'} ({r['name']}): out of memory; peak before "
            f"it {human_bytes(r.get('peak_memory_bytes'))} ({r.get('error')})"
            for r in out_of_memory
        ]
        lines.append("")
    failed = [r for r in runs if r.get("status") not in OK_STATUSES]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['name']}: {r.get('error')} (log: `{r.get('log')}`)" for r in failed]
        lines.append("")
    lines += [
        "Plots: `loss.png` (training loss per step, the band spanning the seeds' minimum to maximum, evaluation loss "
        "as markers), `memory.png` (peak memory split into weights, gradients, optimizer states, master weights and "
        "other).",
        "",
    ]
    return "\n".join(lines)

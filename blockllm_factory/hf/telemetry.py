"""Selection telemetry of a BlockLLM run: a JSON-lines log and, with ``plot_loss``, a plot of the selected blocks.

Driven from a ``TrainerCallback`` of :mod:`.wiring`, for both fronts. The optimizer's
``selection_events`` is the record (it is saved in checkpoints), so a resumed run rewrites the file from it and the
plot covers the whole run.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from blockllm_factory._files import SELECTION_LOG, SELECTION_PLOT  # noqa: F401 - wiring.py reads them here

NAMES_SHOWN_IN_LOG = 6


def event_record(event: dict[str, Any], budget: int, eligible: int) -> dict[str, Any]:
    return {
        "step": int(event["step"]),
        "reason": str(event["reason"]),
        "blocks": len(event["names"]),
        "coordinates": int(event["coordinates"]),
        "budget": int(budget),
        "eligible": int(eligible),
        "names": list(event["names"]),
    }


def describe(record: dict[str, Any]) -> str:
    """One log line: when, why, how much, and which blocks (the first few)."""
    names = record["names"]
    shown = ", ".join(names[:NAMES_SHOWN_IN_LOG])
    if len(names) > NAMES_SHOWN_IN_LOG:
        shown += f", ... (+{len(names) - NAMES_SHOWN_IN_LOG} more)"
    share = record["coordinates"] / record["eligible"] if record["eligible"] else 0.0
    return (
        f"BlockLLM selection at optimizer step {record['step']} ({record['reason']}): {record['blocks']} blocks, "
        f"{record['coordinates']:,} of {record['eligible']:,} coordinates ({share:.2%}): {shown}"
    )


def write_log(path: str, records: Sequence[dict[str, Any]], append: bool) -> None:
    with open(path, "a" if append else "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def selection_matrix(events: Sequence[dict[str, Any]], block_names: Sequence[str], last_step: int) -> list[list[int]]:
    """Rows: blocks; columns: optimizer steps 1..last_step; 1 where the block was updated at that step.

    An event made at step s (after that step's update) governs the updates of steps s+1 up to the next event.
    """
    row_of = {name: index for index, name in enumerate(block_names)}
    matrix = [[0] * last_step for _ in block_names]
    for index, event in enumerate(events):
        start = int(event["step"]) + 1
        stop = int(events[index + 1]["step"]) if index + 1 < len(events) else last_step
        for name in event["names"]:
            row = row_of.get(name)
            if row is None:
                continue
            for step in range(start, min(stop, last_step) + 1):
                matrix[row][step - 1] = 1
    return matrix


def save_plot(path: str, events: Sequence[dict[str, Any]], block_names: Sequence[str], last_step: int) -> str | None:
    """Writes the plot (matplotlib, Agg canvas: no display and no global backend switch); None if nothing to plot."""
    if not events or not block_names or last_step < 1:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = selection_matrix(events, block_names, last_step)
    rows = len(block_names)
    figure = Figure(figsize=(max(7.0, min(4 + 0.05 * last_step, 16)), min(2 + 0.16 * rows, 40)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap="Blues",
        vmin=0,
        vmax=1,
        extent=(0.5, last_step + 0.5, rows - 0.5, -0.5),
    )
    for event in events[1:]:  # reselections
        axes.axvline(int(event["step"]) + 0.5, color="tab:red", linewidth=0.8, linestyle="--")
    every = max(1, rows // 60)  # keep labels legible for big models
    axes.set_yticks(range(0, rows, every))
    axes.set_yticklabels([block_names[index] for index in range(0, rows, every)], fontsize=6)
    axes.set_xlabel("optimizer step")
    reselections = len(events) - 1
    axes.set_title(
        f"BlockLLM: blocks updated per step ({reselections} reselection{'' if reselections == 1 else 's'}, dashed)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def block_order(events: Sequence[dict[str, Any]], model_order: Sequence[str], eligible: Sequence[str] | None):
    """Rows of the plot: the eligible blocks when the optimizer tells them, else every block ever selected."""
    if eligible:
        return list(eligible)
    seen = {name for event in events for name in event["names"]}
    return [name for name in model_order if name in seen]


def output_path(output_dir: str, name: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    return os.path.join(output_dir, name)

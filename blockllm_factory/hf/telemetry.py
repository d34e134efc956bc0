"""Selection telemetry of a BlockLLM run: a JSON-lines log and, with ``plot_loss``, a plot of the selection
(:mod:`.selection_plot`: a layer x module heat map).

Driven from a ``TrainerCallback`` of :mod:`.wiring`, for both fronts. The optimizer's
``selection_events`` is the record (it is saved in checkpoints), so a resumed run rewrites the file from it and the
plot covers the whole run.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from blockllm_factory._files import SELECTION_LOG, SELECTION_PLOT  # noqa: F401 - wiring.py reads them here

from .selection_plot import save_plot  # noqa: F401 - wiring.py calls it here

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


def block_order(events: Sequence[dict[str, Any]], model_order: Sequence[str], eligible: Sequence[str] | None):
    """Rows of the plot: the eligible blocks when the optimizer tells them, else every block ever selected."""
    if eligible:
        return list(eligible)
    seen = {name for event in events for name in event["names"]}
    return [name for name in model_order if name in seen]


def output_path(output_dir: str, name: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    return os.path.join(output_dir, name)

"""``loss.png`` and ``memory.png``, drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

from pathlib import Path

from .files import write_atomic
from .report import group_runs

CATEGORIES = (
    ("parameter_bytes", "weights"),
    ("gradient_bytes", "gradients"),
    ("optimizer_state_bytes", "optimizer states"),
    ("master_weight_bytes", "master weights"),
)


def _panels(runs: list[dict]) -> dict[str | None, list[dict]]:
    return group_runs(runs) or {None: []}


def _figure(panels: int, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, height * panels), layout="constrained")
    return figure, [figure.add_subplot(panels, 1, index + 1) for index in range(panels)]


def _save(figure, path: Path) -> None:
    write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def loss_plot(runs: list[dict], path: Path) -> None:
    grouped = _panels(runs)
    figure, axes = _figure(len(grouped))
    for axis, (group, records) in zip(axes, grouped.items()):
        drawn = False
        for record in records:
            if record.get("status") != "ok" or not record.get("loss_curve"):
                continue
            steps, losses = zip(*record["loss_curve"])
            (line,) = axis.plot(steps, losses, linewidth=1.2, label=record["method"])
            if record.get("eval_curve"):
                eval_steps, eval_losses = zip(*record["eval_curve"])
                axis.plot(eval_steps, eval_losses, "o", color=line.get_color(), markersize=6)
            drawn = True
        axis.set_title(f"Training loss{f' ({group})' if group else ''}; dots: evaluation loss")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=axis.transAxes)
    _save(figure, path)


def memory_plot(runs: list[dict], path: Path) -> None:
    """Per group: the peak as stacked categories (left) and the measured tensors alone, without "other" (right)."""
    from matplotlib.figure import Figure

    grouped = _panels(runs)
    peaks = [r.get("peak_memory_bytes") or 0 for r in runs if r.get("status") == "ok"]
    scale, unit = (2**30, "GiB") if max(peaks, default=0) >= 2**30 else (2**20, "MiB")
    figure = Figure(figsize=(12, 4.5 * len(grouped)), layout="constrained")
    colors = ("#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#b5b5b5")
    for row, (group, records) in enumerate(grouped.items()):
        done = [r for r in records if r.get("status") == "ok"]
        names = [r["method"] for r in done]
        sources = {r.get("peak_memory_source") for r in done}
        measure = "peak RSS" if sources == {"cpu_peak_rss"} else "CUDA max allocated" if sources else "peak"
        suffix = f" ({group})" if group else ""
        for column, with_other in enumerate((True, False)):
            axis = figure.add_subplot(len(grouped), 2, 2 * row + column + 1)
            unit_here, scale_here = (unit, scale) if with_other else ("MiB", 2**20)
            bottoms = [0.0] * len(done)
            for (key, label), color in zip(CATEGORIES, colors):
                heights = [(r.get(key) or 0) / scale_here for r in done]
                axis.bar(names, heights, bottom=bottoms, label=label, color=color)
                bottoms = [b + h for b, h in zip(bottoms, heights)]
            if with_other:
                other = [max(0.0, (r.get("peak_memory_bytes") or 0) / scale_here - b) for r, b in zip(done, bottoms)]
                axis.bar(names, other, bottom=bottoms, label="other (peak minus the above)", color=colors[-1])
                axis.set_title(f"Peak memory{suffix}: bar = {measure}", fontsize="medium")
            else:
                axis.set_title(f"Measured tensors{suffix}: per-category peaks", fontsize="medium")
            axis.set_ylabel(unit_here)
            axis.tick_params(axis="x", labelrotation=20)
            if done:
                axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
            else:
                axis.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=axis.transAxes)
    _save(figure, path)

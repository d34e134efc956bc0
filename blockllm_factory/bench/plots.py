"""``loss.png`` and ``memory.png``, drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

from pathlib import Path

from blockllm_factory._files import write_atomic

from .summary import group_runs, summarize, values_label

CATEGORIES = (
    ("parameter_bytes", "weights"),
    ("gradient_bytes", "gradients"),
    ("optimizer_state_bytes", "optimizer states"),
    ("master_weight_bytes", "master weights"),
)


def _figure(panels: int, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, height * panels), layout="constrained")
    return figure, [figure.add_subplot(panels, 1, index + 1) for index in range(panels)]


def _save(figure, path: Path) -> None:
    write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def _across_seeds(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps every curve logged, and the mean, minimum and maximum of the curves there."""
    tables = [dict(curve) for curve in curves]
    steps = sorted(set.intersection(*(set(table) for table in tables))) if tables else []
    columns = [[table[step] for table in tables] for step in steps]
    return (
        steps,
        [sum(column) / len(column) for column in columns],
        [min(column) for column in columns],
        [max(column) for column in columns],
    )


def loss_plot(runs: list[dict], path: Path) -> None:
    """Per group, one line per method at its best value: the mean over the seeds, with a band from their minimum to
    their maximum; evaluation losses as dots (mean) with bars (minimum to maximum)."""
    import matplotlib

    grouped = group_runs(summarize(runs)) or {None: []}
    by_config: dict[str, list[dict]] = {}
    for record in runs:
        by_config.setdefault(record.get("config") or record["name"], []).append(record)
    figure, axes = _figure(len(grouped))
    for axis, (group, methods) in zip(axes, grouped.items()):
        drawn = False
        # More methods than the default cycle's 10 colours: 20 distinct ones, and dashes for the second ten.
        palette = matplotlib.colormaps["tab20"]
        styles = [(palette(index % 20), "-" if index < 10 else "--") for index in range(len(methods))]
        for (color, linestyle), summary in zip(styles, methods):
            records = [
                r for r in by_config.get(summary["config"], []) if r.get("status") == "ok" and r.get("loss_curve")
            ]
            steps, means, lows, highs = _across_seeds([r["loss_curve"] for r in records])
            if not steps:
                continue
            label = summary["method"]
            if summary.get("best"):
                label += f" ({values_label(summary['best'])})"
            if len(records) > 1:
                label += f", {len(records)} seeds"
            (line,) = axis.plot(steps, means, linewidth=1.2, label=label, color=color, linestyle=linestyle)
            if len(records) > 1:
                axis.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
            evaluated = [r["eval_curve"] for r in records if r.get("eval_curve")]
            if evaluated:
                eval_steps, eval_means, eval_lows, eval_highs = _across_seeds(evaluated)
                errors = [
                    [m - lo for m, lo in zip(eval_means, eval_lows)],
                    [hi - m for m, hi in zip(eval_means, eval_highs)],
                ]
                axis.errorbar(
                    eval_steps, eval_means, yerr=errors, fmt="o", color=line.get_color(), markersize=6, capsize=3
                )
            drawn = True
        axis.set_title(f"Training loss{f' ({group})' if group else ''}; band: seeds' range; dots: evaluation loss")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=axis.transAxes)
    _save(figure, path)


def memory_plot(methods: list[dict], path: Path) -> None:
    """Per group: the peak as stacked categories (left) and the measured tensors alone, without "other", beside
    BlockLLM's floor (right); one bar per method (its best value, means over the seeds; see summary.summarize)."""
    from matplotlib.figure import Figure

    grouped = group_runs(methods) or {None: []}
    peaks = [r.get("peak_memory_bytes") or 0 for r in methods if r.get("status") == "ok"]
    scale, unit = (2**30, "GiB") if max(peaks, default=0) >= 2**30 else (2**20, "MiB")
    tracked = [r.get("peak_tracked_bytes") or 0 for r in methods if r.get("status") == "ok"]
    scale_tracked, unit_tracked = (2**30, "GiB") if max(tracked, default=0) >= 2**30 else (2**20, "MiB")
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
            unit_here, scale_here = (unit, scale) if with_other else (unit_tracked, scale_tracked)
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
                floors = [
                    (index, r["floor_bytes"] / scale_here) for index, r in enumerate(done) if r.get("floor_bytes")
                ]
                if floors:
                    axis.scatter(
                        [index for index, _ in floors],
                        [value for _, value in floors],
                        marker="_",
                        s=600,
                        color="black",
                        label="BlockLLM floor (formula)",
                        zorder=3,
                    )
                axis.set_title(f"Measured tensors{suffix}: per-category peaks", fontsize="medium")
            axis.set_ylabel(unit_here)
            axis.tick_params(axis="x", labelrotation=20)
            if done:
                axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
            else:
                axis.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=axis.transAxes)
    _save(figure, path)

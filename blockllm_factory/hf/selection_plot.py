"""The selection plot: which parts of the model BlockLLM trained over a run, as a layer x module heat map.

One row per decoder layer (and one for the parameters outside the layers: embeddings, final norm, head), one column
per module kind (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ``input_layernorm.weight``, ...). A cell's
colour is the share of that module's coordinates that BlockLLM updated, averaged over the run's optimizer steps; its
number is how many of the run's selections included it, and the strip above marks each reselection on the step axis.
The grid grows with layers and module kinds, not with blocks or steps, so it stays readable from a 4-layer demo to a
7B model (32 layers x 9 kinds); row-group blocks (``...weight[0:128]``) count toward their tensor's cell.

Coordinates kept per block: BlockLLM keeps the same fraction of every picked block (``selection.split_budget``), so a
selection's coordinates are spread over its blocks in proportion to their size (with ``norms: always`` the whole norm
vectors are counted at that fraction too, a difference of a few norm coordinates).
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

# ``model.layers.3.self_attn.q_proj.weight`` (Llama, Qwen), ``transformer.h.3.attn.c_attn.weight`` (GPT-2), ...: the
# first numeric path component is the layer.
_LAYERED = re.compile(r"^(?:.*?\.)?(?P<layer>\d+)\.(?P<module>.+)$")
OUTSIDE = "outside the layers"
ANNOTATE_UP_TO = 800  # cells; beyond, the numbers would not fit their cells


def cell_of(block_name: str) -> tuple[int | None, str]:
    """``(layer, module)`` of a block; layer None for a parameter outside the layers (then module is its name)."""
    param = block_name.split("[", 1)[0]  # a row group counts toward its tensor
    match = _LAYERED.match(param)
    if match is None:
        return None, param
    return int(match["layer"]), match["module"]


def selection_grid(
    events: Sequence[dict[str, Any]],
    block_names: Sequence[str],
    last_step: int,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The heat map's data: ``rows`` (labels), ``columns`` (module kinds), ``share[row][column]`` (None where no
    such module) and ``selections[row][column]``.

    An event made at step s (after that step's update) governs the updates of steps s+1 up to the next event's step.
    ``sizes``: coordinates per block (BlockLLM's ``block_sizes``); without it every block counts as one.
    """
    size = (lambda name: int(sizes.get(name, 1))) if sizes is not None else (lambda name: 1)
    cells = {name: cell_of(name) for name in block_names}
    for event in events:  # blocks selected but not listed (a caller without the eligible list)
        cells.update((name, cell_of(name)) for name in event["names"] if name not in cells)
    layers = sorted({layer for layer, _ in cells.values() if layer is not None})
    layered = list(dict.fromkeys(module for layer, module in cells.values() if layer is not None))
    outside = list(dict.fromkeys(module for layer, module in cells.values() if layer is None))
    columns = layered + outside
    rows = [f"layer {layer}" for layer in layers] + ([OUTSIDE] if outside else [])
    row_of = {layer: index for index, layer in enumerate(layers)}
    column_of = {module: index for index, module in enumerate(columns)}

    def position(name: str) -> tuple[int, int]:
        layer, module = cells[name]
        return (len(layers) if layer is None else row_of[layer]), column_of[module]

    total = [[0] * len(columns) for _ in rows]
    for name in cells:
        row, column = position(name)
        total[row][column] += size(name)
    updated = [[0.0] * len(columns) for _ in rows]
    selections = [[0] * len(columns) for _ in rows]
    for index, event in enumerate(events):
        start = int(event["step"]) + 1
        stop = min(int(events[index + 1]["step"]) if index + 1 < len(events) else last_step, last_step)
        steps = max(0, stop - start + 1)
        picked = sum(size(name) for name in event["names"])
        fraction = min(1.0, int(event["coordinates"]) / picked) if picked and sizes is not None else 1.0
        seen = set()
        for name in event["names"]:
            row, column = position(name)
            updated[row][column] += steps * fraction * size(name)
            seen.add((row, column))
        for row, column in seen:
            selections[row][column] += 1
    share = [
        [
            updated[row][column] / (total[row][column] * last_step) if total[row][column] else None
            for column in range(len(columns))
        ]
        for row in range(len(rows))
    ]
    return {"rows": rows, "columns": columns, "share": share, "selections": selections}


def figure_size(rows: int, columns: int) -> tuple[float, float]:
    """Inches: about 0.6 per column and 0.3 per row (labels of 7 pt fit), within what a screen shows at once."""
    return min(16.0, max(6.0, 3.0 + 0.6 * columns)), min(14.0, max(3.5, 2.2 + 0.3 * rows))


def save_plot(
    path: str,
    events: Sequence[dict[str, Any]],
    block_names: Sequence[str],
    last_step: int,
    sizes: Mapping[str, int] | None = None,
) -> str | None:
    """Writes the heat map (matplotlib, Agg canvas: no display and no global backend switch); None if nothing to
    plot."""
    if not events or not block_names or last_step < 1:
        return None
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = selection_grid(events, block_names, last_step, sizes)
    rows, columns = grid["rows"], grid["columns"]
    values = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in grid["share"]]))
    width, height = figure_size(len(rows), len(columns))
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    strip, axes = figure.subplots(2, 1, height_ratios=[0.5, max(1.5, height - 2.2)])
    reselections = [int(event["step"]) for event in events[1:]]
    strip.set_xlim(0.5, last_step + 0.5)
    strip.set_yticks([])
    strip.xaxis.tick_top()
    strip.tick_params(labelsize=7)
    strip.vlines(reselections, 0, 1, color="tab:red", linewidth=0.8)
    strip.set_xlabel("optimizer step (red: a reselection)", fontsize=7)
    strip.xaxis.set_label_position("top")
    # The colours span 0 to the largest share (at sparsity 0.95 every share is small); grey: no such module.
    top = max((value for row in grid["share"] for value in row if value is not None), default=0.0) or 1.0
    cmap = colormaps["Blues"].with_extremes(bad="0.9")
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=top)
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(columns, rotation=40, ha="right", fontsize=7)
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels(rows, fontsize=7)
    if len(rows) * len(columns) <= ANNOTATE_UP_TO:
        for row in range(len(rows)):
            for column in range(len(columns)):
                if grid["share"][row][column] is not None and grid["selections"][row][column]:
                    dark = grid["share"][row][column] > 0.6 * top
                    axes.text(column, row, str(grid["selections"][row][column]), ha="center", va="center",
                              fontsize=6, color="white" if dark else "black")  # fmt: skip
    colorbar = figure.colorbar(image, ax=[strip, axes], fraction=0.04, pad=0.02)
    colorbar.set_label("share of the module's coordinates updated, mean over steps", fontsize=7)
    colorbar.ax.tick_params(labelsize=7)
    count = len(reselections)
    figure.suptitle(
        f"BlockLLM over {last_step} optimizer steps: {count} reselection{'' if count == 1 else 's'} "
        "(numbers: selections that included the module)",
        fontsize=9,
    )
    figure.savefig(path, dpi=100)
    return path

"""The selection plot (blockllm_factory/hf/selection_plot.py): a layer x module heat map that stays readable from the
4-layer demo to a 7B model. The 7B case uses synthetic selection events over a 7B model's block names: no model."""

import random

import pytest
from matplotlib.image import imread

from blockllm_factory.hf.selection_plot import OUTSIDE, cell_of, figure_size, save_plot, selection_grid

LLAMA_MODULES = {  # Llama-2-7B: module kind -> shape
    "self_attn.q_proj.weight": (4096, 4096),
    "self_attn.k_proj.weight": (4096, 4096),
    "self_attn.v_proj.weight": (4096, 4096),
    "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (11008, 4096),
    "mlp.up_proj.weight": (11008, 4096),
    "mlp.down_proj.weight": (4096, 11008),
    "input_layernorm.weight": (4096,),
    "post_attention_layernorm.weight": (4096,),
}


def llama_blocks(layers: int, scale: int, head_rows: int | None) -> dict[str, int]:
    """Block name -> coordinates of a Llama with ``layers`` layers, shapes divided by ``scale``; q/k/v in row groups of
    ``head_rows`` rows (``blockllm_block_size: head``) when given."""
    blocks = {"model.embed_tokens.weight": 32000 * 4096 // scale**2}
    for layer in range(layers):
        for module, shape in LLAMA_MODULES.items():
            shape = tuple(max(1, side // scale) for side in shape)
            name = f"model.layers.{layer}.{module}"
            numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
            if head_rows and module.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                for first in range(0, shape[0], head_rows):
                    blocks[f"{name}[{first}:{first + head_rows}]"] = head_rows * shape[1]
            else:
                blocks[name] = numel
    blocks["model.norm.weight"] = 4096 // scale
    blocks["lm_head.weight"] = 32000 * 4096 // scale**2
    return blocks


def synthetic_events(sizes: dict[str, int], steps: int, every: int, share: float, seed: int = 0) -> list[dict]:
    """A selection every ``every`` steps: random blocks worth about ``share`` of the coordinates, cut to the budget."""
    rng = random.Random(seed)
    names = list(sizes)
    budget = int(share * sum(sizes.values()))
    events = []
    for step in range(0, steps, every):
        picked, total = [], 0
        for name in rng.sample(names, len(names)):
            if total >= budget:
                break
            picked.append(name)
            total += sizes[name]
        events.append({"step": step, "names": picked, "coordinates": min(budget, total), "reason": "synthetic"})
    return events


def test_cells_are_layer_and_module_and_row_groups_count_toward_their_tensor():
    assert cell_of("model.layers.12.self_attn.q_proj.weight[128:256]") == (12, "self_attn.q_proj.weight")
    assert cell_of("transformer.h.3.attn.c_attn.weight") == (3, "attn.c_attn.weight")
    assert cell_of("lm_head.weight") == (None, "lm_head.weight")


def test_the_share_is_of_coordinates_updated_over_the_run_and_selections_are_counted():
    sizes = {"model.layers.0.mlp.weight": 30, "model.layers.1.mlp.weight": 10, "lm_head.weight": 60}
    events = [
        {"step": 0, "names": ["model.layers.0.mlp.weight"], "coordinates": 30},  # governs steps 1-4: all of it
        {"step": 4, "names": ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight"], "coordinates": 20},
    ]  # the second (half of its 40 picked coordinates) governs steps 5-8
    grid = selection_grid(events, list(sizes), 8, sizes)
    assert grid["rows"] == ["layer 0", "layer 1", OUTSIDE]
    assert grid["columns"] == ["mlp.weight", "lm_head.weight"]
    assert grid["share"][0] == [pytest.approx((4 * 30 + 4 * 15) / (30 * 8)), None]
    assert grid["share"][1] == [pytest.approx(4 * 5 / (10 * 8)), None]
    assert grid["share"][2] == [None, 0.0]
    assert grid["selections"] == [[2, 0], [1, 0], [0, 0]]


@pytest.mark.parametrize(
    ("layers", "scale", "head_rows", "steps", "rows", "columns"),
    [
        (4, 64, None, 24, 5, 12),  # the demo's size: 4 layers, whole tensors
        (32, 1, 128, 10_000, 33, 12),  # 7B: 32 layers, q/k/v in head row groups (3,072 blocks), 10,000 steps
    ],
    ids=["demo", "7b"],
)
def test_the_heat_map_stays_readable_from_the_demo_to_7b(tmp_path, layers, scale, head_rows, steps, rows, columns):
    sizes = llama_blocks(layers, scale, head_rows)
    events = synthetic_events(sizes, steps, every=max(1, steps // 40), share=0.05)
    grid = selection_grid(events, list(sizes), steps, sizes)
    assert (len(grid["rows"]), len(grid["columns"])) == (rows, columns)  # grows with layers, not blocks or steps
    shares = [value for row in grid["share"] for value in row if value is not None]
    assert all(0.0 <= value <= 1.0 for value in shares) and max(shares) > 0.0
    # Summed over cells, the coordinates updated are what the selections updated (the budget, every step).
    total = sum(sizes.values())
    cell_sizes = {}
    for name, size in sizes.items():
        cell_sizes[_cell(grid, name)] = cell_sizes.get(_cell(grid, name), 0) + size
    updated = sum(
        share * cell_sizes[row, column] * steps
        for row, values in enumerate(grid["share"])
        for column, share in enumerate(values)
        if share
    )
    governed = sum(event["coordinates"] * (steps // len(events)) for event in events)
    assert updated == pytest.approx(governed, rel=0.02) and updated < 0.06 * total * steps

    width, height = figure_size(rows, columns)
    assert height / rows >= 0.25 and width / columns >= 0.6  # 7-pt labels have room at every size
    path = save_plot(str(tmp_path / "selection.png"), events, list(sizes), steps, sizes)
    pixels = imread(path)
    assert 300 <= pixels.shape[0] <= 1500 and 500 <= pixels.shape[1] <= 1700, pixels.shape


def _cell(grid, name):
    layer, module = cell_of(name)
    row = grid["rows"].index(OUTSIDE if layer is None else f"layer {layer}")
    return row, grid["columns"].index(module)


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert save_plot(str(tmp_path / "none.png"), [], ["a"], 3) is None
    assert not (tmp_path / "none.png").exists()

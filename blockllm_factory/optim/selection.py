"""Which blocks to update, and how many coordinates of each (paper, section 2.2)."""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Input/output embeddings and heads, matched on parameter names (as the original BlockLLM code does, but on whole
# name components so that e.g. "attention.output.dense" is not taken for an output head).
EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|lm_head|shared|embeddings)(\.|$)"
)


# Normalisation layers' weights and biases: a name component that contains "norm" (input_layernorm, post_attention_
# layernorm, model.norm, q_norm, LayerNorm, ...) or GPT-2's ln_1 / ln_2 / ln_f.
NORM_PATTERN = re.compile(r"(^|\.)([^.]*norm[^.]*|ln_[a-z0-9]+)(\.|$)", re.IGNORECASE)


def is_embedding_name(name: str) -> bool:
    return EMBEDDING_PATTERN.search(name) is not None


def is_norm_name(name: str) -> bool:
    return NORM_PATTERN.search(name) is not None


@dataclass(frozen=True)
class Block:
    """A unit of selection: the flat coordinates [start, stop) of the parameter ``param``."""

    name: str
    param: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def split_blocks(name: str, shape: Sequence[int], numel: int, block_size: int) -> list[Block]:
    """The blocks of one parameter: the whole tensor (``block_size`` 0, the paper), or groups of whole rows of about
    ``block_size`` coordinates for a matrix (a row group of a q/k/v projection with ``block_size`` = head_dim x hidden
    is one attention head). Vectors (norms, biases) and tensors smaller than ``block_size`` stay whole."""
    if block_size <= 0 or len(shape) < 2 or numel <= block_size:
        return [Block(name, name, 0, numel)]
    rows = int(shape[0])
    row_numel = numel // rows
    rows_per_block = max(1, block_size // row_numel)
    if rows_per_block >= rows:
        return [Block(name, name, 0, numel)]
    return [
        Block(
            f"{name}[{first}:{min(rows, first + rows_per_block)}]",
            name,
            first * row_numel,
            min(rows, first + rows_per_block) * row_numel,
        )
        for first in range(0, rows, rows_per_block)
    ]


def leading_equal_blocks(blocks: Sequence[Block]) -> int:
    """How many of a parameter's blocks, from the first, have the first one's size and follow each other from
    coordinate 0: their norms can be taken in one reduction over a ``(count, size)`` view."""
    size = blocks[0].numel
    count = 0
    for block in blocks:
        if block.numel != size or block.start != count * size:
            break
        count += 1
    return count


def visit_frequency(visits: Mapping[str, int], name: str) -> float:
    """The paper's sum-normalised visit count f_l, smoothed by one visit each so that unvisited blocks stay finite."""
    total = sum(visits.values()) + len(visits)
    return (visits[name] + 1) / total


def rank_blocks(
    norms: Mapping[str, float],
    visits: Mapping[str, int],
    names: Sequence[str],
    sizes: Mapping[str, int] | None = None,
    score: str = "norm",
) -> list[str]:
    """Blocks in decreasing order of ||G_l|| / f_l (``score="norm"``, the paper) or ||G_l|| / (f_l sqrt(|l|))
    (``"norm_per_sqrt_size"``: the norm grows with sqrt(size) for gradients of equal per-coordinate magnitude, which
    otherwise favours large tensors); ties keep model order so that ranks are deterministic."""
    order = {name: index for index, name in enumerate(names)}

    def value(name: str) -> float:
        ranked = norms.get(name, 0.0) / visit_frequency(visits, name)
        return ranked / math.sqrt(sizes[name]) if score == "norm_per_sqrt_size" else ranked

    return sorted(names, key=lambda name: (-value(name), order[name]))


def pick_blocks(ranked: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[str]:
    """Takes blocks in rank order until their coordinates reach the budget (the last one may overshoot)."""
    picked, total = [], 0
    for name in ranked:
        if total >= budget:
            break
        picked.append(name)
        total += sizes[name]
    return picked


def reserve_blocks(reserved: Sequence[str], sizes: Mapping[str, int], budget: int) -> tuple[dict[str, int], int]:
    """Blocks in every selection (``norms="always"``), kept whole, and the budget they leave for the ranked blocks.
    Should they hold more than the budget, they alone share it as :func:`split_budget` shares it."""
    total = sum(sizes[name] for name in reserved)
    if total >= budget:
        return split_budget(reserved, sizes, budget), 0
    return {name: sizes[name] for name in reserved}, budget - total


def split_budget(picked: Sequence[str], sizes: Mapping[str, int], budget: int) -> dict[str, int]:
    """Coordinates to keep in each picked block: the same top fraction of every block, so that their sum <= budget.

    The paper keeps "the top k parameters by gradient magnitude" of each selected layer through a per-layer
    percentile threshold; its value of k was lost in the text. We take k_l = floor(q |l|) with q = budget / sum |l|,
    which fills the budget as closely as whole coordinates allow. Blocks left with k_l = 0 are dropped.
    """
    total = sum(sizes[name] for name in picked)
    if total <= budget:
        return {name: sizes[name] for name in picked}
    fraction = budget / total
    keep = {name: math.floor(fraction * sizes[name]) for name in picked}
    return {name: count for name, count in keep.items() if count > 0}


def threshold_budget(
    picked: Sequence[str], sizes: Mapping[str, int], norms: Mapping[str, float], budget: int
) -> dict[str, int]:
    """Coordinates to keep in each picked block: as many as lie above one |gradient| threshold over all of them,
    estimated from each block's gradient norm alone, so that their sum <= budget (``keep="threshold"``).

    :func:`split_budget` keeps the same fraction of every block; a block whose gradient is large everywhere then keeps
    as few coordinates as one whose gradient is small. Here each block's coordinates are taken for Laplace with the
    block's root mean square r_l = ||G_l|| / sqrt(|l|) (|g| exponential with mean r_l / sqrt(2)), so a threshold t
    keeps about |l| exp(-t sqrt(2) / r_l) of them; t is the one whose expected total is the budget. Counts are
    rounded down, then the largest remainders take what rounding left of the budget. Blocks left with no coordinate
    are dropped. Without a positive norm among the picked blocks (nothing measured) it falls back to
    :func:`split_budget`.
    """
    total = sum(sizes[name] for name in picked)
    if total <= budget:
        return {name: sizes[name] for name in picked}
    scales = {name: norms.get(name, 0.0) * math.sqrt(2.0 / sizes[name]) for name in picked}  # r_l sqrt(2)
    largest = max(scales.values(), default=0.0)
    if not largest > 0.0 or not math.isfinite(largest):
        return split_budget(picked, sizes, budget)

    def expected(threshold: float) -> dict[str, float]:
        return {
            name: sizes[name] * math.exp(-threshold / scale) if scale > 0.0 else 0.0 for name, scale in scales.items()
        }

    # The expected total falls from `total` at t = 0 to at most `budget` at t = largest * ln(total / budget).
    low, high = 0.0, largest * math.log(total / budget)
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(expected(middle).values()) > budget else (low, middle)
    counts = expected(high)
    keep = {name: min(math.floor(count), sizes[name]) for name, count in counts.items()}
    left = budget - sum(keep.values())
    by_remainder = sorted(picked, key=lambda name: keep[name] - counts[name])  # largest remainder first, stable
    for name in by_remainder[: max(left, 0)]:
        if keep[name] < sizes[name]:
            keep[name] += 1
    return {name: count for name, count in keep.items() if count > 0}


def cut_mask(grad: torch.Tensor, kept: Sequence[tuple[Block, int]]) -> torch.Tensor | None:
    """The flat bool mask of one parameter: in each selected block, its ``keep`` coordinates of largest gradient
    magnitude; None when the selected blocks keep every coordinate of the parameter."""
    flat = grad.reshape(-1)
    if all(keep == block.numel for block, keep in kept) and sum(keep for _, keep in kept) == flat.numel():
        return None
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    for block, keep in kept:
        if keep == block.numel:
            mask[block.start : block.stop] = True
        elif block.numel == flat.numel():
            mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
        else:
            scores = flat[block.start : block.stop].abs()
            mask[torch.topk(scores, keep, sorted=False).indices + block.start] = True
    return mask

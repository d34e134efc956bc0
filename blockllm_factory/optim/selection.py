"""Which blocks to update, and how many coordinates of each (paper, section 2.2)."""

import math
import re
from collections.abc import Mapping, Sequence

# Input/output embeddings and heads, matched on parameter names (as the original BlockLLM code does, but on whole
# name components so that e.g. "attention.output.dense" is not taken for an output head).
EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|lm_head|shared|embeddings)(\.|$)"
)


def is_embedding_name(name: str) -> bool:
    return EMBEDDING_PATTERN.search(name) is not None


def visit_frequency(visits: Mapping[str, int], name: str) -> float:
    """The paper's sum-normalised visit count f_l, smoothed by one visit each so that unvisited blocks stay finite."""
    total = sum(visits.values()) + len(visits)
    return (visits[name] + 1) / total


def rank_blocks(norms: Mapping[str, float], visits: Mapping[str, int], names: Sequence[str]) -> list[str]:
    """Blocks in decreasing order of ||G_l|| / f_l; ties keep model order so that ranks are deterministic."""
    order = {name: index for index, name in enumerate(names)}
    return sorted(
        names,
        key=lambda name: (
            -norms.get(name, 0.0) / visit_frequency(visits, name),
            order[name],
        ),
    )


def pick_blocks(ranked: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[str]:
    """Takes blocks in rank order until their coordinates reach the budget (the last one may overshoot)."""
    picked, total = [], 0
    for name in ranked:
        if total >= budget:
            break
        picked.append(name)
        total += sizes[name]
    return picked


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

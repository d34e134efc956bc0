"""Bit-packed coordinate masks: one bit per coordinate of a tensor's selected blocks, so that a mask costs the
selected blocks' size / 8 bytes, whatever the size of the tensor they belong to.

``ranges`` are the flat ``[start, stop)`` spans of the selected blocks of one tensor, in increasing order: the mask is
packed over their coordinates only (the others are never trained). Without ``ranges`` it covers the whole tensor
(whole-tensor blocks: the ZeRO and FSDP engines, and a tensor whose blocks are all selected).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}

Ranges = Sequence[tuple[int, int]]


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def packed_size(numel: int) -> int:
    """The bytes of a packed mask over ``numel`` coordinates."""
    return -(-numel // 8)


def span_numel(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)


def pack_mask(mask: torch.Tensor, ranges: Ranges | None = None) -> torch.Tensor:
    """Packs a flat bool tensor (of a whole tensor's coordinates) into uint8 words, least significant bit first; with
    ``ranges``, only the coordinates inside them."""
    flat = mask.reshape(-1)
    if ranges is not None:
        flat = torch.cat([flat[start:stop] for start, stop in ranges])
    flat = flat.to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int, ranges: Ranges | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the flat bool mask of the whole tensor's ``numel`` coordinates (False outside
    ``ranges``)."""
    span = numel if ranges is None else span_numel(ranges)
    bools = ((bits.unsqueeze(1) >> _shifts(bits.device)) & 1).view(-1)[:span].bool()
    if ranges is None:
        return bools
    mask = torch.zeros(numel, dtype=torch.bool, device=bits.device)
    offset = 0
    for start, stop in ranges:
        mask[start:stop] = bools[offset : offset + stop - start]
        offset += stop - start
    return mask


@dataclass
class KeptCoordinates:
    """Reads and writes the kept coordinates of one tensor's flat view without a bool mask of the whole tensor.

    ``spans``: the selected blocks' merged ``(start, stop, kept)`` spans and ``mask`` the bools over their coordinates
    (one after another); or ``spans`` None and ``mask`` over the whole tensor. Span by span, the bools cost the
    selected blocks' size, not the tensor's (the embedding and the head hold a few of their many row blocks)."""

    mask: torch.Tensor
    spans: list[tuple[int, int, int]] | None

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The kept coordinates of ``flat``, in flat order (a new tensor)."""
        if self.spans is None:
            return flat[self.mask]
        pieces, offset = [], 0
        for start, stop, _ in self.spans:
            pieces.append(flat[start:stop][self.mask[offset : offset + stop - start]])
            offset += stop - start
        return torch.cat(pieces)

    def scatter_(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Writes ``values`` (as :meth:`gather` orders them) into the kept coordinates of ``flat``."""
        if self.spans is None:
            flat.masked_scatter_(self.mask, values)
            return
        offset = taken = 0
        for start, stop, kept in self.spans:
            flat[start:stop].masked_scatter_(self.mask[offset : offset + stop - start], values[taken : taken + kept])
            offset += stop - start
            taken += kept

"""Bit-packed coordinate masks: one bit per coordinate of a selected block, so that a mask costs |block| / 8 bytes."""

import torch

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a flat bool tensor into uint8 words, least significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the flat bool mask of ``numel`` coordinates."""
    return ((bits.unsqueeze(1) >> _shifts(bits.device)) & 1).view(-1)[:numel].bool()

"""Block-wise 8-bit Adam moments for the selected coordinates, in bitsandbytes' own format.

``bitsandbytes.optim.AdamW8bit`` keeps each moment as uint8 codes into a shared 256-entry quantile map (signed dynamic
map for the first moment, unsigned for the second), with one fp32 ``absmax`` per block of 256 values. BlockLLM keeps
its compact moment vectors (one entry per selected coordinate) the same way: between steps only the codes and absmax
exist; a step decodes them into fp32, runs the masked AdamW update and encodes them again, tensor by tensor (flat.py
says why). The fp32 copy lives for one chunk of the update at a time. Like bitsandbytes (``min_8bit_size``),
vectors shorter than 4096 entries stay fp32: their absmax and maps would cost more than they save.

Encoding and decoding are bitsandbytes' ``quantize_blockwise``/``dequantize_blockwise``, which run on CPU and CUDA;
bitsandbytes is imported only when 8-bit states are asked for.
"""

from typing import Any

import torch

BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (state key, signed map)


def _functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:  # checked at construction, so this only fires if bitsandbytes vanished since
        raise ImportError("BlockLLM with optim_bits=8 needs bitsandbytes: pip install bitsandbytes") from error
    return functional


def check_available() -> None:
    """Raises a ValueError naming ``optim_bits`` when bitsandbytes cannot be imported."""
    try:
        _functional()
    except ImportError as error:
        raise ValueError("Invalid optim_bits: 8 needs bitsandbytes (pip install bitsandbytes), or use 32") from error


def quantized(numel: int) -> bool:
    return numel >= MIN_8BIT_SIZE


def zero_moments_(state: dict[str, Any], numel: int, device: torch.device) -> None:
    """8-bit moments of ``numel`` zeros, made without an fp32 buffer: with absmax 0 every code decodes to 0, which is
    what quantising fp32 zeros would give."""
    functional = _functional()
    blocks = -(-numel // BLOCKSIZE)
    for key, signed in MOMENTS:
        state[f"{key}_q"] = torch.zeros(numel, dtype=torch.uint8, device=device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        state[f"{key}_qmap"] = functional.create_dynamic_map(signed=signed).to(device)


def decode_moments_into(state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Decodes the 8-bit moments of ``state`` into fp32 ``exp_avg``/``exp_avg_sq`` (slices of a flat buffer); the
    codes stay in ``state``."""
    functional = _functional()
    for (key, _), out in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        out.copy_(
            functional.dequantize_blockwise(
                state[f"{key}_q"], absmax=state[f"{key}_absmax"], code=state[f"{key}_qmap"], blocksize=BLOCKSIZE
            )
        )


def encode_moments_from(state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Encodes fp32 ``exp_avg``/``exp_avg_sq`` as the new 8-bit moments of ``state`` (with its maps)."""
    functional = _functional()
    for (key, _), values in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        codes, quant_state = functional.quantize_blockwise(values, code=state[f"{key}_qmap"], blocksize=BLOCKSIZE)
        state[f"{key}_q"] = codes
        state[f"{key}_absmax"] = quant_state.absmax

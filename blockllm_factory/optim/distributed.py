"""Keeping every rank's BlockLLM decisions identical under torch.distributed (DDP, DeepSpeed ZeRO).

Each rank measures gradient norms on its own micro-batches and sees its own loss. Before the optimizer decides
anything, the measurements of all ranks are averaged with one all-reduce of a small vector, so the norm table, the
patience rule and thus the selection agree everywhere. The random generator that samples probed blocks is seeded the
same on every rank and advanced by the same decisions, so the probe sets agree too.

The vector layout: for each block (in a fixed order) its squared gradient norm and a 1/0 flag "measured here", then the
loss sum and the loss count.
"""

import math

import torch
import torch.distributed as dist


def squared_norms_vector(
    block_names: list[str], squared_norms: dict[str, torch.Tensor], losses: list[float]
) -> torch.Tensor:
    device = next(iter(squared_norms.values())).device if squared_norms else torch.device("cpu")
    vector = torch.zeros(2 * len(block_names) + 2, dtype=torch.float32, device=device)
    indices = [index for index, name in enumerate(block_names) if name in squared_norms]
    if indices:
        # One stack and two scatters rather than a kernel launch per block.
        positions = torch.tensor(indices, device=device) * 2
        vector[positions] = torch.stack([squared_norms[block_names[index]].float() for index in indices])
        vector[positions + 1] = 1.0
    vector[-2] = float(sum(losses))
    vector[-1] = float(len(losses))
    return vector


def synchronize(vector: torch.Tensor) -> torch.Tensor:
    """Sums the vector over all ranks (a no-op outside torch.distributed); the collective's own device is used."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return vector
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = vector.to(backend_device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def unpack_measurements(block_names: list[str], vector: torch.Tensor) -> tuple[dict[str, float], float | None]:
    """Norms of the blocks measured on at least one rank (root of the mean square over ranks) and the mean loss."""
    values = vector.tolist()
    norms = {}
    for index, name in enumerate(block_names):
        count = values[2 * index + 1]
        if count > 0:
            mean_square = values[2 * index] / count
            norms[name] = math.sqrt(mean_square)  # NaN and inf stay so: the caller skips such a step
    loss_sum, loss_count = values[-2], values[-1]
    return norms, (loss_sum / loss_count if loss_count > 0 else None)

"""Keeping every rank's BlockLLM decisions identical under torch.distributed (DDP, DeepSpeed ZeRO).

Each rank measures gradient norms and sees its own loss. Before the optimizer decides anything, the measurements of all
ranks are summed with one all-reduce of a small vector, so the norm table, the patience rule and thus the selection
agree everywhere. The random generator that samples probed blocks is seeded the same on every rank and advanced by the
same decisions, so the probe sets agree too.

The vector layout (float64): for each block (in a fixed order) its squared gradient norm as measured here and the
share of the block that this measurement covers, then the loss sum and the loss count. A rank that holds the whole
(already averaged) gradient reports share 1 (DDP, one process); a rank that holds a slice of a partitioned gradient
(DeepSpeed ZeRO) reports the squared norm of its slice and the slice's share of the block. After the sum, a block's
squared norm is ``sum(squares) / sum(shares)``: the mean over ranks in the first case, the full norm in the second.
float64 keeps shares such as 1/3 summing to 1 within rounding that all ranks share bit for bit.
"""

import math

import torch
import torch.distributed as dist


def squared_norms_vector(
    block_names: list[str],
    squared_norms: dict[str, torch.Tensor],
    losses: list[float],
    shares: dict[str, float] | None = None,
) -> torch.Tensor:
    """Packs this rank's measurements; ``shares`` (default: 1 for every measured block) as described above."""
    device = next(iter(squared_norms.values())).device if squared_norms else torch.device("cpu")
    vector = torch.zeros(2 * len(block_names) + 2, dtype=torch.float64, device=device)
    indices = [index for index, name in enumerate(block_names) if name in squared_norms]
    if indices:
        # One stack and two scatters rather than a kernel launch per block.
        positions = torch.tensor(indices, device=device) * 2
        vector[positions] = torch.stack([squared_norms[block_names[index]].double() for index in indices])
        if shares is None:
            vector[positions + 1] = 1.0
        else:
            vector[positions + 1] = torch.tensor(
                [shares[block_names[index]] for index in indices], dtype=torch.float64, device=device
            )
    vector[-2] = float(sum(losses))
    vector[-1] = float(len(losses))
    return vector


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(reference: torch.device) -> torch.device:
    """The device a collective must run on: the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if dist.get_backend() == "gloo" else reference


def synchronize(vector: torch.Tensor) -> torch.Tensor:
    """Sums the vector over all ranks (a no-op outside torch.distributed); the collective's own device is used."""
    if not is_distributed():
        return vector
    reduced = vector.to(collective_device(vector.device))
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks of a tensor (moved to the collective's device and back if needed)."""
    if not is_distributed():
        return tensor
    device = collective_device(tensor.device)
    if device == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return tensor.copy_(moved)


def unpack_measurements(block_names: list[str], vector: torch.Tensor) -> tuple[dict[str, float], float | None]:
    """Norms of the blocks measured on at least one rank and the mean loss (see the module docstring)."""
    values = vector.tolist()
    norms = {}
    for index, name in enumerate(block_names):
        share = values[2 * index + 1]
        if share > 0:
            norms[name] = math.sqrt(values[2 * index] / share)  # NaN and inf stay so: the caller skips such a step
    loss_sum, loss_count = values[-2], values[-1]
    return norms, (loss_sum / loss_count if loss_count > 0 else None)


def register_ddp_probe_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer) -> None:
    """Measures BlockLLM's probed blocks on DDP's averaged gradients instead of each rank's local ones.

    Without this, the probe hooks take each rank's local gradient norm during backward (and free the gradient
    before DDP reduces it), so a probed block's norm is the root mean square of per-rank norms while a selected
    block's norm is that of the averaged gradient: two scales in one table. With it, the probe hooks are off and
    DDP's communication hook, right after the bucket's all-reduce (torch's default averaging hook), records the
    squared norm of every probed block's averaged gradient and zeroes that gradient: probed blocks then add nothing
    to gradient clipping, as in one process, where the hooks free them (a non-finite gradient becomes NaN instead, so
    that an fp16 GradScaler still skips the step and lowers its scale). The result is the norm a single process
    would measure on the global batch. Compact gradients are switched off (dense gradients for the selection): their
    hooks would compact each rank's gradient before DDP averages it.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    name_of = {id(param): name for name, param in optimizer.param_by_name.items()}
    optimizer.set_probe_hooks(False)
    # DDP reduces .grad after autograd accumulated it: the selection keeps dense gradients under DDP.
    optimizer.disable_compact_gradients()

    def allreduce_then_measure_probes(state, bucket):
        params = bucket.parameters()
        future = default_hooks.allreduce_hook(state, bucket)

        def measure(fut) -> torch.Tensor:
            reduced = fut.value()
            probed = optimizer.probe_only_parameters()
            offset = 0
            for param in params:
                numel = param.numel()
                name = name_of.get(id(param))
                if name in probed:
                    grad = reduced.narrow(0, offset, numel)
                    optimizer.record_gradient_norms(name, grad)
                    grad.mul_(0.0)  # zero, but inf/NaN stay NaN: a GradScaler must still see an overflow here
                offset += numel
            return reduced

        return future.then(measure)

    ddp_model.register_comm_hook(None, allreduce_then_measure_probes)

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

Under DDP the gradients themselves are averaged by :class:`GradientAverager` rather than by DDP (whose buckets would
hold and send every eligible weight's gradient): only the selection and the probed tensors cross the wire.
"""

import itertools
import math
from collections.abc import Iterable, Sequence

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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_saved_rank(saved_rank: int, saved_world: int, engine: str) -> None:
    """A state saved per rank (one file each) is loaded by the same rank of as many processes; else a ``ValueError``
    naming both."""
    rank, world = rank_and_world()
    if (saved_rank, saved_world) != (rank, world):
        raise ValueError(
            f"Invalid state_dict: saved by rank {saved_rank} of {saved_world}, loaded by rank {rank} of {world}; "
            f"resume BlockLLM under {engine} with the same number of processes, each rank its own file"
        )


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


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over all ranks (of ``group``) of a tensor (moved to the collective's device and back if needed)."""
    if not is_distributed():
        return tensor
    device = collective_device(tensor.device)
    if device == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
    return tensor.copy_(moved)


def assemble_whole(
    sizes: Sequence[int], pieces: Iterable[tuple[int, int, torch.Tensor]], device: torch.device, group=None
) -> list[torch.Tensor]:
    """Whole fp32 tensors on every rank from the pieces the ranks hold (each coordinate on exactly one rank).

    ``pieces`` are this rank's ``(tensor index, start within the tensor, values)``; they are written into one zero
    buffer of all the tensors, and one all-reduce sums the ranks' buffers (a coordinate's value plus zeros). Returns a
    flat view of the buffer for each of ``sizes``."""
    offsets = list(itertools.accumulate(sizes, initial=0))
    buffer = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    for index, start, values in pieces:
        buffer.narrow(0, offsets[index] + start, values.numel()).copy_(values.reshape(-1))
    all_reduce_sum_(buffer, group)
    return [buffer.narrow(0, offset, size) for offset, size in zip(offsets, sizes)]


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


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over all ranks (divided first, then summed, as DDP's default communication hook does)."""
    if not is_distributed():
        return tensor
    tensor.div_(dist.get_world_size())
    return all_reduce_sum_(tensor)


class GradientAverager:
    """Data parallelism without DDP's buckets: BlockLLM's gradients averaged across ranks in one all-reduce a step.

    DDP would keep a bucket for every eligible weight and all-reduce all of it every step, whatever BlockLLM selected.
    Instead BlockLLM's hooks hand this buffer, at every micro-step, the gradients of the selected blocks and of the
    probed blocks (the norm the ranks agree on is the averaged gradient's), and free the dense gradient: on the first
    step of a selection the selected blocks whole (the top-k mask is cut from the averaged gradient), on the later
    steps only their kept coordinates (the mask is known). After the optimizer step's last backward, :meth:`reduce`
    averages the buffer across ranks; BlockLLM then measures, cuts masks and compacts as in one process. Bytes per
    step: the budget (a selection's first step: its blocks whole, ``coverage`` budgets' worth) and the probed blocks.

    The layout is set with the selection and the probes, which every rank decides alike (see the module docstring),
    so the buffer means the same on every rank; a rank that produced no gradient for a tensor adds zeros. One entry
    per tensor after the gradients says whether any rank produced it (a tensor no rank used is not updated).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self._spans: dict[str, tuple[int, int, list[tuple[int, int]]]] = {}  # name -> (index, offset, ranges)
        self._size = 0
        self._buffer: torch.Tensor | None = None
        self.reduced = False

    def arrange(self, ranges: dict[str, list[tuple[int, int]]]) -> None:
        """What each tensor contributes this step: ``name -> [(start, stop), ...]`` flat coordinate ranges, in an
        order every rank shares. Drops what was collected (a new step, a skipped one, a load)."""
        self._spans, offset = {}, 0
        for index, (name, pieces) in enumerate(ranges.items()):
            self._spans[name] = (index, offset, pieces)
            offset += sum(stop - start for start, stop in pieces)
        self._size = offset
        self._buffer = None
        self.reduced = False

    def add_(self, name: str, grad: torch.Tensor) -> None:
        """Accumulates one micro-step's gradient of ``name`` (its ranges)."""
        if self._buffer is None:
            self._buffer = torch.zeros(self._size + len(self._spans), dtype=self.dtype, device=self.device)
        index, offset, pieces = self._spans[name]
        flat = grad.reshape(-1)
        for start, stop in pieces:
            self._buffer[offset : offset + stop - start].add_(flat[start:stop])
            offset += stop - start
        self._buffer[self._size + index] = 1.0

    def reduce(self) -> dict[str, torch.Tensor]:
        """Averages the buffer across ranks (every rank takes part, with zeros if it produced nothing) and returns the
        averaged values of each tensor some rank produced (its ranges, concatenated); frees the buffer."""
        self.reduced = True
        buffer, self._buffer = self._buffer, None
        if not self._spans:
            return {}
        if buffer is None:
            buffer = torch.zeros(self._size + len(self._spans), dtype=self.dtype, device=self.device)
        all_reduce_mean_(buffer)
        present = buffer[self._size :].tolist()
        return {
            name: buffer[offset : offset + sum(stop - start for start, stop in pieces)]
            for name, (index, offset, pieces) in self._spans.items()
            if present[index] > 0
        }

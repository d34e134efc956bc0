"""One AdamW update for the whole selection: the selected tensors' states in flat buffers, one chain of kernels.

Per-tensor AdamW launches about ten kernels per selected tensor and step; a selection of row groups touches hundreds
of tensors. Here the selected tensors are laid out one after another, in *classes* of tensors that share everything
the update's scalars and dtypes depend on (parameter group, weight dtype, how the weights are kept, 8-bit moments or
not). A class owns one flat buffer per state (``exp_avg``, ``exp_avg_sq``, and ``master`` or ``master_compensation``),
and the compact-gradient carrier uses the same order, so a class's gradients are one slice of it. Each step runs
:func:`functional.adamw_` once per *chunk* of a class (whole tensors, at most ``max(largest tensor's kept
coordinates, CHUNK_FLOOR)`` coordinates, so the step's fp32 temporaries stay as small as per tensor), then writes each
tensor's selected coordinates back. Every operation of the chain is elementwise, so each coordinate gets the bits
the per-tensor update gives it (tests/test_optim.py compares them).

``optimizer.state[param]`` keeps the usual per-tensor entries as *views* of the flat buffers, so ``state_dict()``,
memory accounting and torch's hooks see what they saw before, and a checkpoint holds the same per-tensor tensors as
one of the per-tensor layout. Loading copies them into fresh flat buffers (:meth:`FlatStates.adopt`), whichever
layout wrote them.

8-bit moments stay encoded per tensor: bitsandbytes' blocks of 256 values start at each tensor's first kept
coordinate and share one absmax, so encoding the concatenation would mix the last, partial block of one tensor with
the first values of the next and change their codes. A step decodes a chunk's tensors into one fp32 buffer, runs the
chain once, and encodes each tensor again: bit-identical to the per-tensor path, with two bitsandbytes calls per
moment and tensor left.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .functional import adamw_, round_compensated_
from .masks import KeptCoordinates
from .quantization import decode_moments_into, encode_moments_from

CHUNK_FLOOR = 1 << 22  # coordinates: a chunk may be this long even if every tensor is shorter (16 MiB of fp32)
DIRECT, MASTER, COMPENSATED = "direct", "master", "compensated"  # how a class's weights are kept
COMPENSATION_KEY = "master_compensation"  # "master" in the name files its bytes with the masters (patches/metrics.py)


def weight_kind(dtype: torch.dtype, master: str) -> str:
    """fp32 weights are updated directly; half-precision ones through an fp32 master or a compensation buffer."""
    if dtype == torch.float32:
        return DIRECT
    return COMPENSATED if master == "compensated" else MASTER


@dataclass(frozen=True)
class ClassKey:
    """What the tensors of one class share: the update runs over a class's tensors at once."""

    group: int  # index in param_groups (lr, betas, eps, weight decay)
    dtype: torch.dtype
    kind: str  # DIRECT, MASTER or COMPENSATED
    quantized: bool  # 8-bit moments

    def order(self) -> tuple:
        return (self.group, str(self.dtype), self.kind, self.quantized)


@dataclass(frozen=True)
class Slot:
    """A selected tensor's place: coordinates [start, start + keep) of the layout (and of the gradient carrier)."""

    key: ClassKey
    start: int
    keep: int


@dataclass
class Item:
    """A selected tensor taking part in this step's update (its step count already advanced)."""

    name: str
    param: torch.Tensor
    state: dict[str, Any]
    kept: Callable[[], KeptCoordinates | None]  # unpacked on use (one at a time); None: the whole tensor
    grad: torch.Tensor | None  # the dense gradient; None: the compact one, in the carrier


class _Class:
    def __init__(self, key: ClassKey, start: int, numel: int, device: torch.device) -> None:
        self.key, self.start, self.numel = key, start, numel
        self.buffers: dict[str, torch.Tensor] = {}
        if not key.quantized:
            self.buffers["exp_avg"] = torch.zeros(numel, dtype=torch.float32, device=device)
            self.buffers["exp_avg_sq"] = torch.zeros(numel, dtype=torch.float32, device=device)
        if key.kind == MASTER:
            self.buffers["master"] = torch.zeros(numel, dtype=torch.float32, device=device)
        elif key.kind == COMPENSATED:
            self.buffers[COMPENSATION_KEY] = torch.zeros(numel, dtype=key.dtype, device=device)


class FlatStates:
    """The flat buffers of one selection, from its slots (name -> place, in layout order)."""

    def __init__(self, slots: dict[str, Slot], device: torch.device) -> None:
        self.slots = slots
        self.classes: dict[ClassKey, _Class] = {}
        for slot in slots.values():
            known = self.classes.get(slot.key)
            if known is None:
                self.classes[slot.key] = _Class(slot.key, slot.start, 0, device)
            elif known.start + known.numel != slot.start:
                raise AssertionError("the slots of a class must be contiguous")  # _set_trainable lays them out so
            self.classes[slot.key].numel += slot.keep
        for key, known in self.classes.items():  # allocated once every slot is counted
            self.classes[key] = _Class(key, known.start, known.numel, device)
        self.chunk_limit = max([CHUNK_FLOOR, *(slot.keep for slot in slots.values())])

    def views(self, name: str) -> dict[str, torch.Tensor]:
        """The state entries of tensor ``name`` that live in the flat buffers, as views."""
        slot = self.slots[name]
        owner = self.classes[slot.key]
        local = slot.start - owner.start
        return {key: buffer[local : local + slot.keep] for key, buffer in owner.buffers.items()}

    def init_state(self, name: str, state: dict[str, Any], selected_weights: torch.Tensor) -> None:
        """Fresh states of a newly selected tensor (zero moments and compensation, the master = its weights)."""
        for key, view in self.views(name).items():
            if key == "master":
                view.copy_(selected_weights)
            else:
                view.zero_()
            state[key] = view

    def adopt(self, name: str, state: dict[str, Any], selected_weights: Callable[[], torch.Tensor]) -> None:
        """Moves a loaded state (separate tensors, as any checkpoint holds them) into the flat buffers. A state
        saved with the other ``master`` setting is converted: an fp32 master becomes the compensation its rounded
        weight leaves, a compensation becomes the master weight + compensation stands for."""
        master, compensation = state.pop("master", None), state.pop(COMPENSATION_KEY, None)
        for key, view in self.views(name).items():
            if key == "master":
                view.copy_(master if master is not None else _with(selected_weights(), compensation))
            elif key == COMPENSATION_KEY:
                if compensation is not None:
                    view.copy_(compensation)
                elif master is not None:
                    view.copy_(master - selected_weights().float())
                else:
                    view.zero_()
            else:
                view.copy_(state[key])
            state[key] = view

    def update_(
        self,
        items: list[Item],
        groups: list[dict[str, Any]],
        lr: Callable[[dict[str, Any], int], float],
        carrier_grad: torch.Tensor | None = None,
    ) -> None:
        """The AdamW step of ``items``: one chain per chunk of tensors that are adjacent in a class and share a step
        count (all of a class, except after a skipped first step or a tensor without gradient). ``lr(group, step)``
        is the rate of a chunk's update; ``carrier_grad`` holds the compact gradients at the slots' offsets."""
        items = sorted(items, key=lambda item: self.slots[item.name].start)
        chunk: list[Item] = []
        for item in items:
            if chunk and not self._extends(chunk, item):
                self._update_chunk(chunk, groups, lr, carrier_grad)
                chunk = []
            chunk.append(item)
        if chunk:
            self._update_chunk(chunk, groups, lr, carrier_grad)

    def _extends(self, chunk: list[Item], item: Item) -> bool:
        last, slot = self.slots[chunk[-1].name], self.slots[item.name]
        first = self.slots[chunk[0].name]
        return (
            slot.key == last.key
            and slot.start == last.start + last.keep
            and item.state["step"] == chunk[-1].state["step"]
            and (item.grad is None) == (chunk[-1].grad is None)
            and slot.start + slot.keep - first.start <= self.chunk_limit
        )

    def _update_chunk(
        self,
        chunk: list[Item],
        groups: list[dict[str, Any]],
        lr: Callable[[dict[str, Any], int], float],
        carrier_grad: torch.Tensor | None,
    ) -> None:
        first = self.slots[chunk[0].name]
        key, owner = first.key, self.classes[first.key]
        group = groups[key.group]
        numel = sum(self.slots[item.name].keep for item in chunk)
        local = first.start - owner.start
        device = chunk[0].param.device
        segments = []
        offset = 0
        for item in chunk:
            keep = self.slots[item.name].keep
            segments.append((item, offset, keep))
            offset += keep

        if chunk[0].grad is None:  # the carrier holds the chunk's gradients in layout order: one slice
            grad = carrier_grad[first.start : first.start + numel].float()
        else:
            grad = torch.empty(numel, dtype=torch.float32, device=device)
            for item, start, keep in segments:
                kept = item.kept()
                flat_grad = item.grad.reshape(-1)
                grad[start : start + keep].copy_(flat_grad if kept is None else kept.gather(flat_grad))

        if key.quantized:
            exp_avg = torch.empty(numel, dtype=torch.float32, device=device)
            exp_avg_sq = torch.empty(numel, dtype=torch.float32, device=device)
            for item, start, keep in segments:
                decode_moments_into(item.state, exp_avg[start : start + keep], exp_avg_sq[start : start + keep])
        else:
            exp_avg = owner.buffers["exp_avg"][local : local + numel]
            exp_avg_sq = owner.buffers["exp_avg_sq"][local : local + numel]

        if key.kind == MASTER:
            weights = owner.buffers["master"][local : local + numel]
        else:  # gathered: the compensated weights in fp32, or the fp32 weights themselves
            weights = torch.empty(numel, dtype=torch.float32, device=device)
            for item, start, keep in segments:
                kept = item.kept()
                flat_param = item.param.data.view(-1)
                weights[start : start + keep].copy_(flat_param if kept is None else kept.gather(flat_param))
            if key.kind == COMPENSATED:
                compensation = owner.buffers[COMPENSATION_KEY][local : local + numel]
                weights.add_(compensation)

        beta1, beta2 = group["betas"]
        adamw_(
            weights,
            grad,
            exp_avg,
            exp_avg_sq,
            step=chunk[0].state["step"],
            lr=lr(group, chunk[0].state["step"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

        if key.quantized:
            for item, start, keep in segments:
                encode_moments_from(item.state, exp_avg[start : start + keep], exp_avg_sq[start : start + keep])
        if key.kind == MASTER:
            rounded = weights.to(key.dtype)
        elif key.kind == COMPENSATED:
            rounded = round_compensated_(weights, compensation, key.dtype)
        else:
            rounded = weights
        for item, start, keep in segments:
            kept = item.kept()
            flat_param = item.param.data.view(-1)
            if kept is None:
                flat_param.copy_(rounded[start : start + keep])
            else:
                kept.scatter_(flat_param, rounded[start : start + keep])


def _with(rounded: torch.Tensor, compensation: torch.Tensor | None) -> torch.Tensor:
    return rounded.float() if compensation is None else rounded.float().add_(compensation)

"""Every live tensor storage of a training run, its peak and what made it up; :mod:`.metrics` drives it.

Not a patch surface (no ``apply``). :class:`StorageTracker` is a ``TorchDispatchMode``: every operator's input and
output tensors pass through it, and each storage on the training device is counted once (by its ``StorageImpl``),
from the first time it is seen until it is freed (a weak reference to its Python object, which PyTorch keeps alive
exactly as long as the storage). The sum is what the caching allocator's ``max_memory_allocated`` sees on a GPU,
without the allocator's rounding: the CPU counterpart of that peak.

What each storage was is decided by what became of it: the callback tags the model's weights and buffers, gradients,
optimizer state and masters as it samples them (see :mod:`.metrics`); a saved-tensor hook marks what autograd saved
for the backward pass; every other storage keeps the phase in which it was created (forward, the loss path from the
output embedding on, backward, optimizer step). At a new peak the live records are kept (at the first free after
it, when nothing else can have been added), so the composition at the peak is exact even for a storage tagged later
(a gradient is only known as one once it is accumulated).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Composition keys, in the order reports show them; the first four are the harness's tracked categories.
TRACKED = ("weights", "gradients", "optimizer_state", "masters")
UNTRACKED = ("activations", "loss_path", "temporaries", "other")
CATEGORIES = TRACKED + UNTRACKED
SUMMARY_KEYS = (
    "peak_storage_bytes",
    "peak_composition",
    "untracked_bytes",
    "peak_phase",
    "peak_step",
    "peak_storage_bytes_after_first_step",
    "peak_largest",
)
LARGEST = 16  # the largest storages at the peak, listed in the summary: what a category's bytes are made of


class _Record:
    __slots__ = ("nbytes", "phase", "step", "category", "saved", "ref", "name")

    def __init__(self, nbytes: int, phase: str, step: int | None) -> None:
        self.nbytes = nbytes
        self.phase = phase
        self.step = step
        self.category: str | None = None  # one of TRACKED once tagged
        self.saved = False  # saved by autograd for the backward pass
        self.ref: Any = None
        self.name: str | None = None  # the parameter whose data it was when first seen as one (a gathered weight)

    def kind(self) -> str:
        if self.category is not None:
            return self.category
        if self.phase == "loss":
            return "loss_path"
        if self.saved:
            return "activations"
        if self.phase in ("forward", "backward", "optimizer", "evaluation"):
            return "temporaries"
        return "other"  # inputs, buffers made before training, the data loader's batches


class StorageTracker(TorchDispatchMode):
    """Counts the live storages on ``device_type``; :meth:`start` / :meth:`stop` bracket the training."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, _Record] = {}
        self.total = 0
        self.peak = 0
        # BlockLLM's first step measures every block (all gradients live at once): the peak of the later steps apart.
        self.later_peak = 0
        self.peak_phase: str | None = None
        self.peak_step: int | None = None
        self.phase = "other"
        self.step: int | None = None
        self._peak_records: list[_Record] = []
        self._pending = False  # a new peak whose live set is not kept yet
        self._hooks: Any = None
        self.active = False
        # id(parameter) -> its name, set by the callback: a storage seen as a parameter's data is listed by that name
        # (under ZeRO-3 a gathered weight's storage is a new one at each gather)
        self.names: dict[int, str] = {}

    # ------------------------------------------------------------------ counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves((args, kwargs, out)):
            if isinstance(value, torch.Tensor):
                self._see(value)
        return out

    def _see(self, tensor: torch.Tensor) -> _Record | None:
        if tensor.device.type != self.device_type:
            return None
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested or fake tensors own no plain storage
            return None
        key = storage._cdata
        record = self.live.get(key)
        nbytes = storage.nbytes()
        if record is None:
            if nbytes == 0 or storage.data_ptr() == 0:
                return None
            record = _Record(nbytes, self.phase, self.step)
            record.ref = weakref.ref(storage, lambda ref, key=key: self._free(key, ref))
            self.live[key] = record
            self._grow(nbytes)
        elif record.nbytes != nbytes:  # resized in place
            if nbytes < record.nbytes:
                self._keep_peak()
            self._grow(nbytes - record.nbytes)
            record.nbytes = nbytes
        if record.name is None and self.names:
            record.name = self.names.get(id(tensor))
        return record

    def _grow(self, delta: int) -> None:
        self.total += delta
        if self.step is not None and self.step >= 1:
            self.later_peak = max(self.later_peak, self.total)
        if self.total > self.peak:
            self.peak = self.total
            self.peak_phase, self.peak_step = self.phase, self.step
            self._pending = True

    def _keep_peak(self) -> None:
        if self._pending:  # nothing was added since the peak: the live set is the one at the peak
            self._peak_records = list(self.live.values())
            self._pending = False

    def _free(self, key: int, ref: Any) -> None:
        record = self.live.get(key)
        if record is None or record.ref is not ref:
            return
        self._keep_peak()
        del self.live[key]
        self.total -= record.nbytes

    # ------------------------------------------------------------------ what a storage is
    def tag(self, tensor: Any, category: str) -> None:
        """``tensor``'s storage is one of :data:`TRACKED` (the first tag holds: a weight is never a gradient)."""
        if not isinstance(tensor, torch.Tensor):
            return
        record = self._see(tensor)
        if record is not None and record.category is None:
            record.category = category

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        record = self._see(tensor)
        if record is not None:
            record.saved = True
        return tensor

    # ------------------------------------------------------------------ bracket
    def start(self) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.__enter__()
        self._hooks.__enter__()
        self.active = True

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        self._hooks.__exit__(None, None, None)
        self.__exit__(None, None, None)
        self._keep_peak()

    # ------------------------------------------------------------------ report
    def composition(self) -> dict[str, int]:
        """Bytes per category of the storages live at the peak."""
        if self._pending:
            self._keep_peak()
        parts = dict.fromkeys(CATEGORIES, 0)
        for record in self._peak_records:
            parts[record.kind()] += record.nbytes
        return parts

    def summary(self) -> dict[str, Any]:
        if not self.peak:
            return dict.fromkeys(SUMMARY_KEYS)
        parts = self.composition()
        return {
            "peak_storage_bytes": self.peak,
            "peak_composition": parts,
            "untracked_bytes": sum(parts[key] for key in UNTRACKED),
            "peak_phase": self.peak_phase,
            "peak_step": None if self.peak_step is None else self.peak_step + 1,  # 1: the first step
            "peak_storage_bytes_after_first_step": self.later_peak or None,
            # [bytes, category, phase made in, step made in (1: the first), parameter name or None], largest first
            "peak_largest": [
                [
                    record.nbytes,
                    record.kind(),
                    record.phase,
                    None if record.step is None else record.step + 1,
                    record.name,
                ]
                for record in sorted(self._peak_records, key=lambda record: -record.nbytes)[:LARGEST]
            ],
        }

"""The bytes each rank sends in torch.distributed collectives, per training step; :mod:`.metrics` drives it.

Not a patch surface (no ``apply``). :class:`CollectiveCounter` is a ``TorchDispatchMode``: every collective of
torch.distributed reaches the dispatcher as a ``c10d`` operator (``c10d.allreduce_``, ``c10d._reduce_scatter_base_``,
...), whether Python called it (``dist.all_reduce``, DeepSpeed's ``deepspeed.comm``, a DDP communication hook) or C++
did (DDP's reducer all-reducing its buckets, and the map of the parameters each rank used). The mode sees each one
on the thread that issues it (on CPU the autograd engine runs the reducer's hooks on the training thread) and counts
the bytes of the tensors this rank contributes, by the operator's argument names:

* ``tensors`` of ``allreduce_``, ``allreduce_coalesced_``, ``reduce_`` and ``send``; of ``broadcast_`` only on the
  root rank (the others receive);
* ``input_tensor`` / ``input_tensors`` / ``inputs`` / ``input_list`` / ``input`` of the all-gathers, reduce-scatters,
  all-to-alls, gathers and scatters (a scatter's inputs exist only on its root);
* nothing for ``recv_`` and ``barrier``.

That is the payload a rank hands the collective, independent of the algorithm the backend picks (a ring all-reduce
puts 2 (world - 1) / world of it on the wire, a tree or gloo's algorithms other shares). DeepSpeed's CPU shared-memory
all-reduce (``deepspeed.inference_all_reduce_``, used for inference only) is counted as an all-reduce too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SUMMARY_KEYS = (
    "collective_bytes_per_step",
    "collective_bytes_by_op",
    "collective_calls_by_op",
    "collective_bytes_outside_steps",
)
_SENT_ARGUMENTS = ("tensors", "input_tensor", "input_tensors", "inputs", "input_list", "input")
_NOT_SENT = ("recv_", "recv_any_source_", "barrier", "monitored_barrier_")


def _group_rank(process_group: Any) -> int:
    try:
        return int(process_group.rank())
    except Exception:  # a script object without the binding: the default group's rank
        import torch.distributed as dist

        return dist.get_rank()


def _op_name(func: Any) -> str:
    return func._schema.name.split("::", 1)[-1]  # "c10d::allreduce_" -> "allreduce_"


def sent_bytes(func: Any, args: tuple, kwargs: dict) -> int | None:
    """Bytes this rank contributes to the collective ``func`` (None: not a collective)."""
    namespace = getattr(func, "namespace", "")
    name = _op_name(func)
    if namespace == "deepspeed" and "all_reduce" in name:
        return sum(_nbytes(value) for value in tree_leaves((args, kwargs)))
    if namespace != "c10d" or name in _NOT_SENT:
        return None
    values = {argument.name: value for argument, value in zip(func._schema.arguments, args)}
    values.update(kwargs or {})
    if name == "broadcast_" and _group_rank(values.get("process_group")) != int(values.get("root_rank", 0)):
        return 0
    return sum(_nbytes(leaf) for key in _SENT_ARGUMENTS if key in values for leaf in tree_leaves(values[key]))


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class CollectiveCounter(TorchDispatchMode):
    """Counts the bytes this rank sends in collectives, per training step (``step``: 0-based index of the step under
    way, None between steps); :meth:`start` / :meth:`stop` bracket the training."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.per_step: dict[int, int] = {}
        self.by_op: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.outside_steps = 0
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sent = sent_bytes(func, args, kwargs or {})
        if sent is not None:
            name = _op_name(func)
            self.by_op[name] = self.by_op.get(name, 0) + sent
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.step is None:
                self.outside_steps += sent
            else:
                self.per_step[self.step] = self.per_step.get(self.step, 0) + sent
        return func(*args, **(kwargs or {}))

    def begin_step(self, index: int) -> None:
        self.step = index
        self.per_step.setdefault(index, 0)

    def end_step(self) -> None:
        self.step = None

    def start(self) -> None:
        self.__enter__()
        self.active = True

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.__exit__(None, None, None)

    def summary(self) -> dict[str, Any]:
        return {
            "collective_bytes_per_step": [self.per_step[index] for index in sorted(self.per_step)],
            "collective_bytes_by_op": dict(sorted(self.by_op.items())),
            "collective_calls_by_op": dict(sorted(self.calls.items())),
            "collective_bytes_outside_steps": self.outside_steps,
        }

"""The gradient carrier: where BlockLLM keeps the selection's compact gradients (``compact_gradients``).

One flat buffer, the ``.grad`` of a carrier tensor, holds every selected tensor's masked gradient at
``[offset, offset + keep)`` and, in its last entry, a sentinel that turns NaN when a probed gradient was not finite (so
that a GradScaler sees the overflow even though probed gradients are freed). The carrier is a parameter of the
optimizer's last parameter group, so a ``torch.amp.GradScaler`` unscales and checks the compact gradients like any
gradient; its own data is one expanded scalar (no memory).
"""

import torch

GRADIENT_CARRIER_NAME = "blockllm.compact_gradients"  # the carrier's name in its parameter group's "param_names"


def is_carrier_group(group: dict) -> bool:
    """Whether a parameter group (as saved or as held) is the carrier's: it holds no state."""
    return list(group.get("param_names", ())) == [GRADIENT_CARRIER_NAME]


class GradientCarrier:
    """The carrier tensor of ``budget + 1`` entries and which tensors' compact gradients it holds this step."""

    def __init__(self, params: list[torch.nn.Parameter], budget: int) -> None:
        # bf16 when every block is bf16, else fp32: a GradScaler refuses fp16 gradients.
        dtype = torch.bfloat16 if {param.dtype for param in params} == {torch.bfloat16} else torch.float32
        data = torch.zeros((), dtype=dtype, device=params[0].device).expand(budget + 1)
        self.parameter = torch.nn.Parameter(data, requires_grad=False)
        self._spans: dict[str, tuple[int, int]] = {}  # parameter name -> (offset, coordinates kept)
        self._filled: set[str] = set()  # parameters whose compact gradient holds this step's gradient

    def param_group(self) -> dict:
        return {"params": [self.parameter], "param_names": [GRADIENT_CARRIER_NAME]}

    def arrange(self, spans: dict[str, tuple[int, int]]) -> None:
        """Where each selected tensor's compact gradient sits: ``name -> (offset, keep)``, set with the selection."""
        self._spans = dict(spans)

    def holds(self, name: str) -> bool:
        return name in self._filled

    def gradient(self, name: str) -> torch.Tensor | None:
        """The compact gradient of ``name`` if it holds this step's gradient, else None."""
        if name not in self._filled:
            return None
        offset, keep = self._spans[name]
        return self.parameter.grad[offset : offset + keep]

    def add_(self, name: str, values: torch.Tensor) -> None:
        """Accumulates a tensor's masked gradient coordinates (one micro-step's) into its span."""
        offset, _ = self._spans[name]
        self._buffer()[offset : offset + values.numel()].add_(values)
        self._filled.add(name)

    def flag_nonfinite_(self, squared_norm: torch.Tensor) -> None:
        """Makes the sentinel NaN when a probed gradient was not finite (``squared_norm`` is), for a GradScaler."""
        sentinel = self._buffer()[-1:]
        sentinel.add_((squared_norm * 0.0).to(sentinel.dtype))

    def forget(self) -> None:
        """After ``zero_grad``: the buffer (zeroed or freed by torch) holds no tensor's gradient."""
        self._filled.clear()

    def release(self) -> None:
        """Frees the buffer (after the update, a skipped step or a load)."""
        self.parameter.grad = None
        self._filled.clear()

    def _buffer(self) -> torch.Tensor:
        carrier = self.parameter
        if carrier.grad is None:
            carrier.grad = torch.zeros(carrier.shape, dtype=carrier.dtype, device=carrier.device)
        return carrier.grad

"""The one list of what engines and fronts may use of a BlockLLM optimizer, and what a subclass may override.

:class:`BlockLLMEngine` is the public interface: the data-parallel averaging (``distributed.py``), the ZeRO engine
(``zero.py``), the Trainer wiring (``blockllm_factory/hf``) and the LLaMA-Factory patches use these names and no others
(a test scans them), and :class:`~blockllm_factory.optim.BlockLLM` and
:class:`~blockllm_factory.optim.zero.ZeroBlockLLM` satisfy it. :data:`EXTENSION_POINTS` are the methods a subclass that
runs the same decisions on another memory layout may override; everything else, the decisions included, is not meant to
be overridden (a test checks ``ZeroBlockLLM``).
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

# Methods a subclass may override (their docstrings say what each returns): the groups handed to torch
# (``_arrange_groups``), a parameter's coordinate count (``_block_numel``), this rank's norms and the parameters to
# update (``_measure``), the masked update (``_apply_updates``), the buffers kept for the trainable tensors
# (``_arrange_trainable``), and the per-parameter part of a checkpoint, written
# (``state_dict``, through ``_state_dict_through_hooks``) and read back (``_unpack_state_dict``); and one class
# attribute, ``routes_rows``: whether embedding and head gradients may reach it as rows (rows.py; an engine that takes
# every gradient whole through its own buffers sets it False).
EXTENSION_POINTS = (
    "_arrange_groups",
    "_block_numel",
    "_measure",
    "_apply_updates",
    "_arrange_trainable",
    "state_dict",
    "_unpack_state_dict",
    "routes_rows",
)


@runtime_checkable
class BlockLLMEngine(Protocol):
    """A BlockLLM optimizer as engines and fronts see it (besides torch's ``Optimizer`` interface)."""

    # What it is and what it decided (read-only).
    block_names: list[str]  # every block, in model order
    budget: int  # coordinates updated per step
    eligible_numel: int  # coordinates BlockLLM may select
    compact_gradients: bool
    optim_bits: int
    master: str
    include_embeddings: bool  # the embeddings and the head among the blocks (what `auto` resolved to)
    # Set by an engine whose loss scale the probed gradients carry (an fp16 GradScaler's ``get_scale``).
    probe_grad_scale: Callable[[], float] | None

    @property
    def param_by_name(self) -> Mapping[str, torch.nn.Parameter]: ...
    @property
    def block_sizes(self) -> Mapping[str, int]: ...
    @property
    def probed_blocks(self) -> list[str]: ...
    @property
    def kept_coordinates(self) -> dict[str, int]: ...
    @property
    def norm_table(self) -> dict[str, float]: ...
    @property
    def selection(self) -> dict[str, Any]: ...
    @property
    def selection_events(self) -> list[dict[str, Any]]: ...
    @property
    def skipped_steps(self) -> int: ...
    @property
    def gradient_carrier(self) -> torch.nn.Parameter | None: ...

    # The rate of a selected tensor's update, from its group and its update count since it was selected (from 1):
    # every engine's masked update reads it (``reselect_warmup`` ramps it after a reselection).
    def update_lr(self, group: dict[str, Any], step: int) -> float: ...

    # What feeds it.
    def record_loss(self, value: float) -> None: ...
    def record_gradient_norms(self, name: str, grad: torch.Tensor) -> torch.Tensor: ...
    def record_probe_norm(self, name: str, squared_norm: torch.Tensor) -> None: ...
    def measure_gradients(self) -> None: ...
    def probe_only_parameters(self) -> set[str]: ...
    def rescale_norms(self, names: Iterable[str], factor: float) -> None: ...
    def skip_step(self, reason: str) -> None: ...
    # Options (norm_type, error_if_nonfinite) as torch.nn.utils.clip_grad_norm_'s.
    def clip_grad_norm_(
        self, max_norm: float, parameters: Iterable[torch.Tensor] | None = None, **options: Any
    ) -> torch.Tensor: ...

    # How an engine that owns the gradients switches BlockLLM's own gradient handling off (DeepSpeed), or has it
    # averaged across ranks instead of DDP (one all-reduce of the selected and probed blocks per step).
    def set_probe_hooks(self, enabled: bool) -> None: ...
    def average_gradients_across_ranks(self) -> None: ...
    def reduce_gradients(self) -> None: ...

    # Checkpoints (with torch's state_dict / load_state_dict).
    def run_state(self) -> dict[str, Any]: ...

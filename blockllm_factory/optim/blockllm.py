"""The BlockLLM optimizer (Ramesh et al., arXiv 2406.17296, section 2.2).

Each step only a few parameter tensors ("blocks") are trainable, holding about (1 - sparsity) of the eligible
coordinates. Blocks are ranked by gradient norm over visit frequency; inside the picked blocks a top-k mask by
gradient magnitude trims the update to the budget. The selection is revisited when the loss stops falling (the current
loss is at or above the mean of the last ``patience`` losses). Gradients, Adam moments and fp32 master weights exist
only for the selection, and every other parameter has ``requires_grad=False`` so that autograd neither computes nor
stores anything for it. With ``compact_gradients`` (the default), a selected block's gradient is cut down to its
masked coordinates as soon as autograd has accumulated it, so gradient memory stays within the budget too.

The cycle of one optimizer step, as the trainer sees it::

    loss.backward()                # grads for the selection (compacted to the mask); probed blocks leave only their
                                   # norm (hooks free them)
    optimizer.record_loss(loss)    # once per optimizer step, averaged over accumulation micro-steps by the caller
    optimizer.step()               # masked AdamW on the selection, norm table, patience rule, next selection/probe
    optimizer.zero_grad()
"""

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.optim import Optimizer

from .carrier import GradientCarrier, is_carrier_group
from .distributed import GradientAverager, squared_norms_vector, synchronize, unpack_measurements
from .flat import ClassKey, FlatStates, Item, Slot, weight_kind
from .masks import KeptCoordinates, pack_mask, packed_size, span_numel, unpack_mask
from .quantization import check_available, quantized, zero_moments_
from .run_state import RUN_STATE_KEY, RunState
from .selection import (
    Block,
    cut_mask,
    is_embedding_name,
    is_norm_name,
    leading_equal_blocks,
    pick_blocks,
    rank_blocks,
    reserve_blocks,
    split_blocks,
    split_budget,
    threshold_budget,
)
from .settings import DEFAULTS, SETTINGS, check

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]
ParamGroups = Iterable[dict[str, Any]]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def named_param_groups(params: NamedParams | ParamGroups) -> list[dict[str, Any]]:
    """``params`` as a list of parameter groups whose ``"params"`` are lists of ``(name, parameter)`` pairs.

    Accepts what :class:`BlockLLM` accepts (``model.named_parameters()``, or groups of such pairs) and refuses anything
    else with a ``ValueError`` naming the group; an engine adapter that rearranges the groups reads them with this.
    """
    params = list(params)
    _check(bool(params), "Invalid params: empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    for index, group in enumerate(groups):
        entries = list(group["params"])
        _check(
            all(isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) for entry in entries),
            f"Invalid params: group {index} must hold (name, parameter) pairs, e.g. model.named_parameters()",
        )
        group["params"] = entries
    return groups


class BlockLLM(Optimizer):
    """AdamW restricted to a changing, gradient-selected set of parameter blocks.

    Args:
        params: ``model.named_parameters()``, or parameter groups whose ``"params"`` are ``(name, parameter)`` pairs
            (e.g. one group with weight decay and one without). Parameters with ``requires_grad=False`` at
            construction are never trained.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (decoupled weight decay, applied to the
            selected coordinates only).
        sparsity: share of the eligible coordinates that is *not* updated at a step, in [0, 1). The paper uses 0.95.
        patience: the window m of the loss rule; the selection is revisited when the current loss is at or above
            the mean of the last m losses.
        probe: how norms of unselected blocks are measured. ``"sample"`` (the paper): ``probe_blocks`` random
            unselected blocks per step. ``"exact"``: every block's gradient norm is measured on the step after the loss
            rule fires, through post-accumulate-grad hooks that record the norm and free each gradient at once.
        probe_blocks: extra blocks sampled per step with ``probe="sample"``.
        include_embeddings: also train input embeddings and output heads (needed to pretrain from scratch). By
            default they are frozen, as in the original code.
        seed: seed of the optimizer's own random generator (block sampling); its state is saved in ``state_dict``.
        compact_gradients: keep only the masked coordinates of each selected block's gradient. A hook cuts the dense
            gradient down right after autograd accumulates it (the first backward after a reselection also cuts the
            top-k mask from it) and frees it, so gradient bytes stay within ``budget`` plus one transient tensor.
            The compact gradients are the ``.grad`` of :attr:`gradient_carrier`, a tensor in the last parameter group,
            so a ``torch.amp.GradScaler`` unscales and checks them like any gradient. Clip with
            :meth:`clip_grad_norm_` (``torch.nn.utils.clip_grad_norm_(model.parameters())`` no longer sees them).
            Turn it off where an engine owns the gradient buffers (DeepSpeed): then selected blocks keep dense
            gradients and the mask is cut at the first step from the accumulated gradient. Under data parallelism
            without DDP (:meth:`average_gradients_across_ranks`) the hooks hand the gradients to an all-reduce of the
            selected and probed blocks first.
        score: how blocks are ranked: ``"norm"`` (the paper: gradient norm over visit frequency) or
            ``"norm_per_sqrt_size"`` (the same divided by sqrt(block size), which removes the bias toward large
            blocks).
        block_size: 0 (the paper): every parameter tensor is one block. N > 0: matrices are split into groups of
            whole rows of about N coordinates each (vectors and smaller tensors stay whole), so that the budget can
            spread over more layers; a partly selected tensor holds moments and (compact) gradients only for the
            coordinates of its selected blocks.
        optim_bits: 32 (fp32 Adam moments) or 8 (block-wise 8-bit moments in bitsandbytes' format, for compact
            moment vectors of at least 4096 entries; needs bitsandbytes).
        norms: the policy for normalisation layers' weights and biases (parameters with a name component that contains
            ``norm``, e.g. ``input_layernorm``, ``model.norm``, ``LayerNorm``, or GPT-2's ``ln_1``/``ln_f``).
            ``"select"`` (the paper): ordinary blocks, ranked and selected like any other. ``"always"``: in every
            selection, whole, inside the budget (the ranked blocks share what they leave; their moments are reset
            with every reselection like the others'). ``"frozen"``: never trained, like the embeddings without
            ``include_embeddings``.
        master: how half-precision (bf16/fp16) weights keep the precision their updates need, for the selected
            coordinates only. ``"fp32"``: an fp32 master copy (4 bytes a coordinate), updated and written back
            rounded. ``"compensated"``: a compensation buffer in the weights' dtype (2 bytes a coordinate): each step
            updates weight + compensation in fp32, writes the rounded weight and keeps the rounding error as the new
            compensation (Kahan-style summation, as torch-optimi does). fp32 weights need neither.
        coverage: how many budgets' worth of blocks a selection picks in rank order: 1 (the paper) fills the budget
            with whole blocks; c > 1 picks blocks until c budgets are filled and keeps the top 1/c of each block's
            coordinates by gradient magnitude (the same budget over c times as many blocks).
        keep: how many coordinates each picked block keeps when the picked blocks hold more than the budget.
            ``"fraction"``: the same top fraction of every block (the paper's per-layer top-k). ``"threshold"``: as
            many as lie above one |gradient| threshold over all picked blocks, estimated from each block's measured
            norm (its coordinates taken for Laplace with the block's root mean square), so that blocks with larger
            gradients keep more of the same budget (``selection.threshold_budget``).
        reselect_warmup: W > 0 ramps the learning rate of every selection after the first linearly over its first W
            updates (its k-th update uses k/W of the group's rate, for k < W): the moments of a new selection start
            from zero, so without it Adam's first updates of the new blocks are full-size steps in the gradient's
            sign. 0 (the paper): no ramp. The first selection follows the scheduler's warm-up alone.
        reselect_until: N > 0: the last optimizer step (counted from 1) at which the loss rule may revisit the
            selection; the selection then stays to the end of the run (with ``probe="exact"`` a rule fired at step N
            still reselects at N + 1, after its measuring step). 0 (the paper): no limit.

    Engines and subclasses: what an engine adapter (DDP's communication hook, ``distributed.py``; the Trainer wiring)
    may use is listed once, in ``interface.py`` (:class:`~blockllm_factory.optim.interface.BlockLLMEngine`), and so are
    the extension points a subclass that runs the same decisions on another memory layout may override
    (``EXTENSION_POINTS``; ``ZeroBlockLLM`` in ``zero.py``, on DeepSpeed's partitions). Each extension point's
    docstring begins with "Extension point". :meth:`load_state_dict` itself is not overridden: it runs torch's, with
    its hooks.
    """

    def __init__(
        self,
        params: NamedParams | ParamGroups,
        lr: float = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        eps: float = DEFAULTS["eps"],
        weight_decay: float = DEFAULTS["weight_decay"],
        sparsity: float = DEFAULTS["sparsity"],
        patience: int = DEFAULTS["patience"],
        probe: str = DEFAULTS["probe"],
        probe_blocks: int = DEFAULTS["probe_blocks"],
        include_embeddings: bool = DEFAULTS["include_embeddings"],
        seed: int = DEFAULTS["seed"],
        compact_gradients: bool = DEFAULTS["compact_gradients"],
        optim_bits: int = DEFAULTS["optim_bits"],
        score: str = DEFAULTS["score"],
        block_size: int = DEFAULTS["block_size"],
        norms: str = DEFAULTS["norms"],
        master: str = DEFAULTS["master"],
        coverage: float = DEFAULTS["coverage"],
        reselect_warmup: int = DEFAULTS["reselect_warmup"],
        reselect_until: int = DEFAULTS["reselect_until"],
        keep: str = DEFAULTS["keep"],
    ) -> None:
        # Every argument is checked before any parameter or state is touched (settings.py: one message per setting;
        # the keywords are the table's settings, a test compares them).
        arguments = locals()
        for name in SETTINGS:
            check(name, arguments[name])
        if optim_bits == 8:
            check_available()
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(self._arrange_groups(named_param_groups(params), defaults), defaults)
        self.sparsity = float(sparsity)
        self.patience = patience
        self.probe = probe
        self.probe_blocks = probe_blocks
        self.include_embeddings = include_embeddings
        self.compact_gradients = compact_gradients
        self.optim_bits = optim_bits
        self.score = score
        self.block_size = block_size
        self.norms = norms
        self.master = master
        self.coverage = float(coverage)
        self.reselect_warmup = reselect_warmup
        self.reselect_until = reselect_until
        self.keep = keep

        self._param_by_name: dict[str, torch.nn.Parameter] = {}
        # Parameter name -> index of its group: torch's load_state_dict replaces the group dicts, not their order.
        self._group_index: dict[str, int] = {}
        for index, group in enumerate(self.param_groups):
            for name, param in zip(group["param_names"], group["params"]):
                if name in self._param_by_name:
                    raise ValueError(f"Invalid params: the parameter name {name!r} appears twice")
                self._param_by_name[name] = param
                self._group_index[name] = index
        # Eligible parameters: trainable at construction, embeddings/heads only on request, norms unless frozen. The
        # rest stays frozen.
        self.eligible_params: list[str] = [
            name
            for name, param in self._param_by_name.items()
            if param.requires_grad
            and (include_embeddings or not is_embedding_name(name))
            and not (norms == "frozen" and is_norm_name(name))
        ]
        _check(
            bool(self.eligible_params),
            "Invalid params: no trainable parameter is eligible for BlockLLM",
        )
        # Blocks, the units of selection: whole tensors, or row groups of them (block_size).
        self._blocks: dict[str, Block] = {}
        self._param_blocks: dict[str, list[Block]] = {}
        for name in self.eligible_params:
            param = self._param_by_name[name]
            blocks = split_blocks(name, tuple(param.shape), self._block_numel(param), block_size)
            self._param_blocks[name] = blocks
            self._blocks.update((block.name, block) for block in blocks)
        self._block_names_of = {name: [block.name for block in blocks] for name, blocks in self._param_blocks.items()}
        self._equal_row_groups = {name: leading_equal_blocks(blocks) for name, blocks in self._param_blocks.items()}
        self.block_names: list[str] = list(self._blocks)
        # norms="always": blocks in every selection, outside the ranking.
        self.always_selected: list[str] = [
            name for name in self.block_names if norms == "always" and is_norm_name(self._blocks[name].param)
        ]
        self._sizes = {name: block.numel for name, block in self._blocks.items()}
        self.eligible_numel = sum(self._sizes.values())
        self.budget = max(1, math.floor((1.0 - self.sparsity) * self.eligible_numel))
        # Compact gradients live in the carrier (carrier.py), the last parameter group's tensor.
        self._carrier: GradientCarrier | None = None
        # Derived from the selection by _set_trainable: selected blocks per parameter, and coordinates kept.
        self._selected_by_param: dict[str, list[Block]] = {}
        self._param_keep: dict[str, int] = {}
        # The selection's place in the flat buffers (flat.py) and the buffers, made on first use.
        self._slots: dict[str, Slot] = {}
        self._flat: FlatStates | None = None
        if compact_gradients:
            self._carrier = GradientCarrier([self._param_by_name[name] for name in self.eligible_params], self.budget)
            self.add_param_group(self._carrier.param_group())

        # Run state (run_state.py): everything there is saved by state_dict() and restored by load_state_dict().
        self._run = RunState.fresh(
            self.block_names,
            self.budget,
            {name: list(self._shape(name)) for name in self.eligible_params},
            patience,
            seed,
        )
        self._pending_losses: list[float] = []
        # Set by average_gradients_across_ranks (data parallelism without DDP): the hooks' gradients, averaged once a
        # step before they are measured and compacted (distributed.py).
        self._averager: GradientAverager | None = None
        self._averaged_kept: set[str] = set()  # tensors whose kept coordinates alone are averaged (_kept_only)
        self._warned_nonfinite = False
        self._warned_no_loss = False
        self._loading: tuple[dict[torch.nn.Parameter, dict[str, Any]], dict[str, Any]] | None = None  # see load

        # Hooks are attached to probed blocks only, and removed once their norm is taken.
        self._probe_handles: list[Any] = []
        self._probe_sq_norms: dict[str, torch.Tensor] = {}
        self._premeasured_sq_norms: dict[str, torch.Tensor] = {}
        # Set by engine adapters (see distributed.py, zero.py): whether probed gradients are measured by hooks during
        # backward (else the engine reports them through record_probe_norm), and the loss scale the probed gradients
        # carry when an fp16 GradScaler scales the loss (hooks see scaled gradients; the selection is unscaled first).
        self.probe_hooks = True
        self.probe_grad_scale: Callable[[], float] | None = None
        self._kept_for_scaler: str | None = None
        # Embedding and head weights whose gradients skip autograd's accumulation (rows.py): name -> its route.
        self._row_routes: dict[str, Any] = {}

        self.register_state_dict_post_hook(_add_run_state, prepend=True)

        # The first step measures every block (one gradient at a time) and makes the first selection.
        self._set_trainable(probed=list(self.block_names))

    # ------------------------------------------------------------------ construction helpers
    def _arrange_groups(self, groups: list[dict[str, Any]], defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """Extension point: the parameter groups (of ``(name, parameter)`` pairs) handed to torch's ``Optimizer``.

        Called once, before ``Optimizer.__init__``, with the groups as given (checked) and the defaults; BlockLLM keeps
        them. An engine that needs another layout returns it here rather than rewriting ``param_groups`` later."""
        return groups

    # ------------------------------------------------------------------ reading the selection, clipping (public)
    # Public methods stand in every section below: those of interface.py's BlockLLMEngine and torch's Optimizer.
    def record_loss(self, value: float) -> None:
        """Feeds the training loss of the coming optimizer step; drives the patience rule."""
        value = float(value)
        if math.isfinite(value):
            self._pending_losses.append(value)

    @property
    def selection(self) -> dict[str, Any]:
        """What is being trained now: block names, coordinates updated per step, budget and reselection count."""
        return {
            "step": self._run.step,
            "names": list(self._run.selected),
            "coordinates": sum(self._run.selected.values()),
            "budget": self.budget,
            "reselections": self._run.reselections,
        }

    @property
    def gradient_carrier(self) -> torch.nn.Parameter | None:
        """The tensor whose ``.grad`` holds the selection's compact gradients (carrier.py); None without
        ``compact_gradients`` at construction."""
        return None if self._carrier is None else self._carrier.parameter

    @property
    def selection_events(self) -> list[dict[str, Any]]:
        """Every (re)selection of the run: its step, block names, coordinates and reason."""
        return self._run.events

    def compact_gradient(self, name: str) -> torch.Tensor | None:
        """The compact gradient of a parameter with selected blocks this step (its masked coordinates, in flattened
        order), if any."""
        return None if self._carrier is None else self._carrier.gradient(name)

    def clip_grad_norm_(
        self,
        max_norm: float,
        parameters: Iterable[torch.Tensor] | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """Like :func:`torch.nn.utils.clip_grad_norm_`, over the compact gradients of the selection (in block order)
        and the dense gradients of ``parameters`` (e.g. ``model.parameters()``; those without a gradient are skipped).

        With ``compact_gradients`` the selection's gradients live in :attr:`gradient_carrier`, where
        ``clip_grad_norm_(model.parameters())`` cannot see them: clip with this method. The norm is that of the
        gradient the update uses (the masked coordinates). Returns the total norm before clipping.
        """
        self._flush_rows()
        grads = [grad for name in self.eligible_params if (grad := self.compact_gradient(name)) is not None]
        if parameters is not None:
            grads += [param.grad for param in parameters if param.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        # The same arithmetic as torch.nn.utils.clip_grads_with_norm_, so that both paths clip bit for bit alike.
        clip_coef_clamped = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(clip_coef_clamped.to(grad.device))
        return total_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._carrier is not None:
            self._carrier.forget()

    @property
    def blocks(self) -> dict[str, Block]:
        """Every block by name: the parameter it belongs to and its flat coordinates [start, stop)."""
        return dict(self._blocks)

    @property
    def kept_coordinates(self) -> dict[str, int]:
        """Coordinates updated per step in each selected block."""
        return dict(self._run.selected)

    @property
    def norm_table(self) -> dict[str, float]:
        """The last measured gradient norm of every block."""
        return dict(self._run.norms)

    @property
    def visit_counts(self) -> dict[str, int]:
        return dict(self._run.visits)

    @property
    def skipped_steps(self) -> int:
        return self._run.skipped_steps

    @property
    def param_by_name(self) -> Mapping[str, torch.nn.Parameter]:
        """Every parameter given at construction by its name (a read-only view), frozen ones included."""
        return MappingProxyType(self._param_by_name)

    @property
    def block_sizes(self) -> Mapping[str, int]:
        """Coordinates of every block by name (a read-only view)."""
        return MappingProxyType(self._sizes)

    @property
    def probed_blocks(self) -> list[str]:
        """Blocks whose gradient norm the next backward measures (besides the selection), in model order."""
        return list(self._run.probed)

    def rescale_norms(self, names: Iterable[str], factor: float) -> None:
        """Multiplies the norm-table entries of ``names`` by ``factor``: for an engine that clips the selected blocks'
        gradients after they were measured, so that the table holds the clipped norms as in one process."""
        for name in names:
            self._run.norms[name] *= factor

    # ------------------------------------------------------------------ step, and what engines feed it (public)
    # torch.compile(optimizer.step) runs it uncompiled: each step takes host-side decisions (the loss rule, the next
    # selection) and changes which parameters require grad and carry hooks; a traced graph would also round the
    # update differently from the eager kernels that docs and tests compare against.
    @torch.compiler.disable(reason="BlockLLM.step takes host-side decisions each step")
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is not None:
                self.record_loss(float(loss))

        self._flush_rows()
        self.reduce_gradients()  # a no-op unless averaging across ranks, and then once per step (the engine's call)
        squared_norms, shares, selected_names = self._measure()
        losses, self._pending_losses = self._pending_losses, []
        # One small vector per step carries every measurement; under torch.distributed it is summed across ranks so
        # that all ranks take the same decisions (see distributed.py). Its .tolist() is the step's only host sync.
        measurements = squared_norms_vector(self.block_names, squared_norms, losses, shares)
        measurements = synchronize(measurements)
        norms, mean_loss = unpack_measurements(self.block_names, measurements)
        if not all(math.isfinite(value) for value in norms.values()):
            self._skip_nonfinite([name for name, value in norms.items() if not math.isfinite(value)])
            return loss
        if not self._run.selected and not norms:
            self._warn_no_gradient()
            return loss
        self._probe_sq_norms = {}
        self._premeasured_sq_norms = {}
        self._run.norms.update(norms)

        self._apply_updates(selected_names)
        self._release_compact_gradients()

        fired = self._loss_rule(mean_loss) if mean_loss is not None else self._no_loss_rule()
        self._run.step += 1
        if self.reselect_until and self._run.step > self.reselect_until:
            fired = False  # the loss rule keeps its window; the selection stays to the end of the run
        if not self._run.selected:
            self._reselect("initial")
        elif self._run.reselect_after_probe:
            self._run.reselect_after_probe = False
            self._reselect("loss plateau (exact probe)")
        elif fired and self.probe == "exact":
            self._run.reselect_after_probe = True  # measure every block on the next backward, then reselect
        elif fired:
            self._reselect("loss plateau" if mean_loss is not None else "no loss recorded: every `patience` steps")
        self._set_trainable(probed=self._next_probe())
        return loss

    def _measure(self) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, list[str]]:
        """Extension point: this rank's squared gradient norms (per block), the share of each block they cover (None:
        all of it) and the parameters with selected blocks that have a gradient to update. Engines that shard
        parameters override this (see zero.py); :meth:`step` sums the result over ranks and decides from it."""
        if self.compact_gradients:
            selected_names = [name for name in self._selected_by_param if self._carrier.holds(name)]
        else:
            selected_names = [name for name in self._selected_by_param if self._param_by_name[name].grad is not None]
        squared_norms = dict(self._probe_sq_norms)
        if squared_norms and self.probe_grad_scale is not None:
            # Probed gradients were measured while still multiplied by the loss scale; the selection is unscaled.
            inverse_square = 1.0 / float(self.probe_grad_scale()) ** 2
            squared_norms = {name: value * inverse_square for name, value in squared_norms.items()}
        # Gradients still held (dense selected tensors, or probed ones kept: no hooks, or the one kept for a
        # GradScaler) are measured now, every block of each; they have been unscaled by then. (With compact gradients
        # the hooks measured the selection during backward, like the probed blocks.)
        premeasured, self._premeasured_sq_norms = self._premeasured_sq_norms, {}
        for name in self.eligible_params:
            grad = self._param_by_name[name].grad
            if grad is None:
                continue
            blocks = [block for block in self._param_blocks[name] if block.name not in squared_norms]
            if not blocks:
                continue
            measured = {}
            if any(block.name not in premeasured for block in blocks):
                measured = dict(zip(self._block_names_of[name], self._tensor_sq_norms(name, grad)))
            squared_norms.update(
                (block.name, premeasured.get(block.name, measured.get(block.name))) for block in blocks
            )
        return squared_norms, None, selected_names

    def _tensor_sq_norms(self, name: str, grad: torch.Tensor) -> list[torch.Tensor]:
        """The squared norm of every block of parameter ``name`` (in block order) from its gradient, in one reduction
        for a tensor's equal row groups: one kernel per tensor rather than one per block (a 7B model's selection
        touches hundreds of attention heads)."""
        blocks = self._param_blocks[name]
        if len(blocks) == 1:
            return [torch.linalg.vector_norm(grad, dtype=torch.float32).square()]
        flat = grad.reshape(-1)
        size = blocks[0].numel
        equal = self._equal_row_groups[name]  # the leading blocks of one size, contiguous from coordinate 0
        squared = list(
            torch.linalg.vector_norm(flat[: equal * size].view(equal, size), dim=1, dtype=torch.float32)
            .square()
            .unbind(0)
        )
        for block in blocks[equal:]:  # the last row group may be shorter
            squared.append(torch.linalg.vector_norm(flat[block.start : block.stop], dtype=torch.float32).square())
        return squared

    def record_gradient_norms(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Records the squared norm of every block of parameter ``name`` from its gradient (a hook, or an engine
        that reduces first, e.g. DDP's communication hook); returns the parameter's total squared norm."""
        squared = self._tensor_sq_norms(name, grad)
        for block_name, value in zip(self._block_names_of[name], squared):
            self.record_probe_norm(block_name, value)
        return squared[0] if len(squared) == 1 else torch.stack(squared).sum()

    def probe_only_parameters(self) -> set[str]:
        """Parameters whose gradient only serves to measure norms this step (probed, none of their blocks selected):
        an engine that measures gradients itself records them with :meth:`record_gradient_norms` and discards them."""
        return {self._blocks[name].param for name in self._run.probed} - set(self._selected_by_param)

    def measure_gradients(self) -> None:
        """Measures the selected blocks' gradient norms now, for the coming :meth:`step` to use.

        Call it right before something rescales the gradients, such as gradient clipping: probed blocks are measured
        during backward, so without this the selected blocks would enter the norm table clipped and the probed ones
        not, which biases the next selection towards probed blocks. The LLaMA-Factory patch calls it before the
        Trainer clips. With ``compact_gradients`` it does nothing: hooks measure every block during backward.
        """
        if self.compact_gradients:
            return
        self._premeasured_sq_norms = {
            block_name: value
            for name in self._selected_by_param
            if self._param_by_name[name].grad is not None
            for block_name, value in zip(
                self._block_names_of[name], self._tensor_sq_norms(name, self._param_by_name[name].grad)
            )
        }

    def _apply_updates(self, selected_names: list[str]) -> None:
        """Extension point: the masked AdamW update of ``selected_names`` (from :meth:`_measure`), after the norm
        table holds this step's measurements and before the loss rule runs: one chain of kernels per chunk of the
        selection (flat.py)."""
        flat_states = self._flat_states()
        items = []
        for name in selected_names:
            param = self._param_by_name[name]
            compact = self._carrier is not None and self._carrier.holds(name)
            if not self.state.get(param):
                self._init_param_state(name, param.grad)
            state = self.state[param]
            state["step"] += 1
            items.append(
                Item(
                    name=name,
                    param=param,
                    state=state,
                    kept=functools.partial(self._kept, name),
                    grad=None if compact else param.grad,
                )
            )
        carrier_grad = None if self.gradient_carrier is None else self.gradient_carrier.grad
        flat_states.update_(items, self.param_groups, self.update_lr, carrier_grad)

    def update_lr(self, group: dict[str, Any], step: int) -> float:
        """The rate of a selected tensor's ``step``-th update since its selection (from 1): the group's, ramped over
        the first ``reselect_warmup`` updates of a selection after the first. Every engine's update reads it."""
        if self.reselect_warmup and self._run.reselections and step < self.reselect_warmup:
            return group["lr"] * step / self.reselect_warmup
        return group["lr"]

    @staticmethod
    def _block_numel(param: torch.nn.Parameter) -> int:
        """Extension point: the number of coordinates of ``param`` (read once, at construction)."""
        return param.numel()

    def record_probe_norm(self, name: str, squared_norm: torch.Tensor) -> None:
        """Adds a probed block's squared gradient norm for the coming step (hooks, or an engine that reduces first)."""
        previous = self._probe_sq_norms.get(name)
        self._probe_sq_norms[name] = squared_norm if previous is None else previous + squared_norm

    def _keeps_gradient_for_scaler(self, name: str) -> bool:
        """On a step with no selection yet (the first), a GradScaler would find no gradient at all and refuse to step
        ("No inf checks were recorded"); one probed block keeps its gradient for it and is measured in step()."""
        if self.probe_grad_scale is None or self._run.selected or self.compact_gradients:
            return False
        if self._kept_for_scaler is None:
            self._kept_for_scaler = name
        return self._kept_for_scaler == name

    def set_probe_hooks(self, enabled: bool) -> None:
        """Turns the probe hooks on or off (an engine that measures probed gradients itself turns them off)."""
        self.probe_hooks = bool(enabled)
        self._set_trainable(probed=self._run.probed)

    def skip_step(self, reason: str) -> None:
        """Records that the step was skipped outside the optimizer (e.g. a GradScaler or DeepSpeed found inf/NaN).

        Like a non-finite measurement inside :meth:`step`: moments, weights, selection and norm table are kept; the
        loss and the probe norms gathered for the skipped step are dropped, and the probed blocks are measured again.
        """
        self._pending_losses = []
        self._skip(reason, "")

    def _skip_nonfinite(self, bad: list[str]) -> None:
        self._skip("non-finite gradient", f" in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")

    def _skip(self, reason: str, detail: str) -> None:
        # Steps are numbered from 1 as in the selection telemetry and the Trainer's logs (global_step after the step).
        self._run.skipped_steps += 1
        self._probe_sq_norms = {}
        self._premeasured_sq_norms = {}
        self._release_compact_gradients()
        # Masks cut during the skipped backward (compact gradients) came from a gradient that was not used: cut again.
        for name in self._selected_by_param:
            state = self.state.get(self._param_by_name[name])
            if state and state["step"] == 0:
                self.state.pop(self._param_by_name[name])
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"BlockLLM: {reason} at optimizer step {self._run.step + 1}{detail}; the step was skipped "
                "(states and selection kept). Further skipped steps are counted in BlockLLM.skipped_steps without a "
                "warning.",
                RuntimeWarning,
                stacklevel=4,
            )
        # Probed blocks are measured again on the next backward.
        self._set_trainable(probed=self._run.probed)

    def _warn_no_gradient(self) -> None:
        """step() before any backward: the first selection needs every block's gradient norm, so it waits for a step
        that has them (an empty norm table would pick blocks blindly and fix them for ``patience`` steps)."""
        self._set_trainable(probed=self._run.probed)
        warnings.warn(
            "BlockLLM: step() was called before any backward(): no gradient was measured, so no block was selected "
            "or updated; call loss.backward() before optimizer.step(). The first selection waits for a step with "
            "gradients.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _no_loss_rule(self) -> bool:
        """Fallback when no loss reaches the optimizer: revisit the selection every ``patience`` steps (warned once),
        rather than keeping the first selection forever."""
        self._run.steps_without_loss += 1
        if self._run.steps_without_loss < self.patience:
            return False
        self._run.steps_without_loss = 0
        if not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                f"BlockLLM: no loss was recorded for {self.patience} optimizer steps (call "
                "optimizer.record_loss(loss) before each step, or pass a closure to step()); without it the loss rule "
                "cannot fire, so the "
                f"selection is now revisited every {self.patience} steps (patience).",
                RuntimeWarning,
                stacklevel=3,
            )
        return True

    def _loss_rule(self, loss: float) -> bool:
        """Paper, section 2.2: revisit the selection when the loss is at or above the mean of the last m losses."""
        self._run.steps_without_loss = 0
        fired = len(self._run.losses) == self.patience and loss >= sum(self._run.losses) / self.patience
        self._run.losses.append(loss)
        return fired

    def _init_param_state(self, name: str, grad: torch.Tensor) -> None:
        """Cuts a newly selected tensor's top-k mask (per selected block) from its first gradient and creates its
        compact states: views of the selection's flat buffers (flat.py), 8-bit moments apart."""
        self._fill_state(name, self._cut_state(name, grad)[0])

    def _cut_state(self, name: str, grad: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
        """A newly selected tensor's state before its moments: the step count and the packed top-k mask cut from
        ``grad`` (also returned unpacked; None when the selection trains the whole tensor)."""
        state: dict[str, Any] = {"step": 0}
        mask = cut_mask(grad, [(block, self._run.selected[block.name]) for block in self._selected_by_param[name]])
        if mask is not None:
            state["mask"] = pack_mask(mask, self._mask_ranges(name))
        return state, mask

    def _fill_state(self, name: str, state: dict[str, Any]) -> None:
        """Adds the compact states to a state from :meth:`_cut_state`: views of the selection's flat buffers
        (flat.py), 8-bit moments apart, and makes it the tensor's state."""
        param = self._param_by_name[name]
        if self._slots[name].key.quantized:
            # Straight to 8-bit: fp32 zeros for the whole new selection at once would be the states' peak.
            zero_moments_(state, self._param_keep[name], param.device)
        flat = param.data.reshape(-1)
        kept = self._kept(name, state)
        self._flat_states().init_state(name, state, flat if kept is None else kept.gather(flat))
        self.state[param] = state

    def _flat_states(self) -> FlatStates:
        """The selection's flat buffers, made on first use after a (re)selection or a load; states loaded from a
        checkpoint (separate tensors, in either layout) are copied into them."""
        if self._flat is None:
            device = self._param_by_name[self.eligible_params[0]].device
            self._flat = FlatStates(self._slots, device)
            for name in self._slots:
                param = self._param_by_name[name]
                state = self.state.get(param)
                if state:
                    self._flat.adopt(name, state, functools.partial(self._selected_weights, name))
        return self._flat

    def _selected_weights(self, name: str) -> torch.Tensor:
        flat = self._param_by_name[name].data.reshape(-1)
        kept = self._kept(name)
        return flat if kept is None else kept.gather(flat)

    def _kept(self, name: str, state: dict[str, Any] | None = None) -> KeptCoordinates | None:
        """The kept coordinates of parameter ``name`` (its state's mask, by default the stored state's), read and
        written span by span over its selected blocks (masks.py); None while the selection trains all of it."""
        state = self.state.get(self._param_by_name[name]) if state is None else state
        if not state or "mask" not in state:
            return None
        ranges = self._mask_ranges(name)
        if ranges is None:
            return KeptCoordinates(unpack_mask(state["mask"], self._param_numel(name)), None)
        spans = _kept_spans(self._selected_by_param[name], self._run.selected)
        return KeptCoordinates(unpack_mask(state["mask"], span_numel(ranges)), spans)

    def coordinate_mask(self, name: str) -> torch.Tensor | None:
        """The flat bool mask of the coordinates of parameter ``name`` that the selection trains (the top-k of its
        selected blocks), unpacked for one use; None while the selection trains all of the tensor or none of it, or
        before its first gradient has cut the mask. Stored packed over the selected blocks only (masks.py)."""
        state = self.state.get(self._param_by_name[name])
        if not state or "mask" not in state:
            return None
        return unpack_mask(state["mask"], self._param_numel(name), self._mask_ranges(name))

    def _mask_ranges(self, name: str) -> list[tuple[int, int]] | None:
        """The flat spans a mask of ``name`` is packed over: its selected blocks' ranges; None when they are the
        whole tensor (then the mask covers it, as under the whole-tensor engines)."""
        ranges = _ranges(self._selected_by_param[name])
        return None if ranges == [(0, self._param_numel(name))] else ranges

    def _param_numel(self, name: str) -> int:
        return self._param_blocks[name][-1].stop

    def _repack_whole_tensor_masks(self) -> None:
        """After a load: a checkpoint written by an earlier build, before masks covered the selected blocks only,
        holds whole-tensor masks; they are packed again over the selected blocks. The two layouts differ in length
        wherever the blocks do not cover the tensor (by at least one unselected block)."""
        for name in self._selected_by_param:
            state = self.state.get(self._param_by_name[name])
            ranges = self._mask_ranges(name)
            if not state or "mask" not in state or ranges is None:
                continue
            bits, numel = state["mask"], self._param_numel(name)
            if bits.numel() == packed_size(numel) != packed_size(span_numel(ranges)):
                state["mask"] = pack_mask(unpack_mask(bits, numel), ranges)

    def _layout_key(self, name: str, keep: int) -> ClassKey:
        param = self._param_by_name[name]
        return ClassKey(
            group=self._group_index[name],
            dtype=param.dtype,
            kind=weight_kind(param.dtype, self.master),
            quantized=self.optim_bits == 8 and quantized(keep),
        )

    # ------------------------------------------------------------------ compact gradients
    def _compact_gradient(self, name: str, param: torch.nn.Parameter) -> None:
        """Called by the hook of a tensor with selected blocks once autograd has accumulated its gradient: records
        the norms of all its blocks (like a probed tensor's), cuts the mask on the first backward of a new selection,
        adds the masked coordinates to the compact buffer and frees the dense gradient."""
        grad = param.grad
        param.grad = None
        if self._averager is not None:  # measured and compacted once averaged across ranks (reduce_gradients)
            if name in self._averaged_kept:  # the mask is cut: its kept coordinates only cross the wire
                mask = self.coordinate_mask(name)
                grad = grad.reshape(-1) if mask is None else grad.reshape(-1)[mask]
            self._averager.add_(name, grad)
            return
        self.record_gradient_norms(name, grad)
        self._compact(name, grad)

    def _compact(self, name: str, grad: torch.Tensor) -> None:
        """Cuts the mask of a newly selected tensor from ``grad`` and adds its masked coordinates to the carrier."""
        param = self._param_by_name[name]
        if not self.state.get(param):
            self._init_param_state(name, grad)
        values = grad.reshape(-1)
        mask = self.coordinate_mask(name)
        self._carrier.add_(name, values if mask is None else values[mask])

    def average_gradients_across_ranks(self) -> None:
        """Engine switch for data parallelism without DDP (the model is not wrapped, or its BlockLLM weights are left
        out of DDP's reducer): the hooks collect, at every micro-step, the gradients of the selected and the probed
        blocks; :meth:`reduce_gradients` averages them across ranks in one all-reduce
        (:class:`~blockllm_factory.optim.distributed.GradientAverager`), then measures them, cuts the masks of a new
        selection and fills the carrier, as the hooks do in one process. After a selection's first step only the
        kept coordinates of its blocks cross the wire (the budget, not ``coverage`` budgets' worth of whole blocks).
        Two differences from one process follow, both in the norm table only: with row-group blocks
        (``block_size``) one process measures every block of a tensor whose gradient it computes, here only the
        selected and probed blocks are (the others' gradients would cross the wire; the others keep their last norm);
        and a selected block whose mask keeps part of it is measured on its kept coordinates, from its selection's
        second step on (one process measures it whole). The updates are the same. Needs ``compact_gradients``."""
        _check(self._carrier is not None, "average_gradients_across_ranks needs compact_gradients=True")
        self.detach_row_gradients()  # the averager takes whole gradients from the hooks
        self._averager = GradientAverager(self._carrier.parameter.dtype, self._carrier.parameter.device)
        self._set_trainable(probed=self._run.probed)

    def reduce_gradients(self) -> None:
        """Under :meth:`average_gradients_across_ranks`: averages this step's gradients across ranks and measures and
        compacts them. Call it once per optimizer step, after the last backward and before anything reads or clips
        the gradients (the Trainer wiring does, right after the last micro-step's backward); :meth:`step` calls it if
        that was not done. Every rank must call it (it is a collective). Otherwise it does nothing."""
        averager = self._averager
        if averager is None or averager.reduced:
            return
        measured = self._averaged_blocks()
        reduced = averager.reduce()
        # A new selection's states are made once the averaged buffer is freed: on its first step the buffer holds its
        # blocks whole (coverage budgets' worth), and the moments would otherwise be allocated beside it.
        fresh: dict[str, dict[str, Any]] = {}  # name -> its state from _cut_state (the mask packed)
        values = grad = mask = None
        for name, values in reduced.items():
            if name in self._averaged_kept:  # the kept coordinates, in the order the carrier holds them
                self._record_kept_norms(name, values)
                self._carrier.add_(name, values)
                continue
            param = self._param_by_name[name]
            grad = values
            if values.numel() != param.numel():  # some blocks of the tensor: in place, zeros elsewhere
                grad = torch.zeros(param.numel(), dtype=values.dtype, device=values.device)
                offset = 0
                for start, stop in _ranges(measured[name]):
                    grad[start:stop] = values[offset : offset + stop - start]
                    offset += stop - start
            squared = [
                torch.linalg.vector_norm(grad[block.start : block.stop], dtype=torch.float32).square()
                for block in measured[name]
            ]
            for block, value in zip(measured[name], squared):
                self.record_probe_norm(block.name, value)
            if name in self._selected_by_param and self.state.get(param):
                self._compact(name, grad)
            elif name in self._selected_by_param:
                fresh[name], mask = self._cut_state(name, grad)
                self._carrier.add_(name, grad.reshape(-1) if mask is None else grad.reshape(-1)[mask])
            else:  # probed only: a non-finite gradient must still reach a GradScaler
                self._carrier.flag_nonfinite_(torch.stack(squared).sum())
        del reduced, values, grad, mask  # the last views of the averaged buffer (and the last unpacked mask)
        for name, state in fresh.items():
            self._fill_state(name, state)

    def _record_kept_norms(self, name: str, values: torch.Tensor) -> None:
        """Records the squared norm of each selected block of ``name`` from its kept coordinates (``values``: the
        tensor's masked gradient, its blocks' kept coordinates one block after another in flat order)."""
        blocks = sorted(self._selected_by_param[name], key=lambda block: block.start)
        counts = [self._run.selected[block.name] for block in blocks]
        for block, chunk in zip(blocks, values.split(counts)):
            self.record_probe_norm(block.name, torch.linalg.vector_norm(chunk, dtype=torch.float32).square())

    def _kept_only(self) -> set[str]:
        """Tensors whose kept coordinates alone are averaged across ranks: those with selected blocks whose mask is
        cut (their state exists: not the first step of their selection) and none of whose blocks is probed."""
        probed = {self._blocks[name].param for name in self._run.probed}
        return {name for name in self._param_keep if name not in probed and self.state.get(self._param_by_name[name])}

    def _averaged_blocks(self) -> dict[str, list[Block]]:
        """The blocks whose gradients cross the wire under :meth:`average_gradients_across_ranks`, by tensor: the
        selected and the probed ones (the other blocks of their tensors are not measured), in an order every rank
        shares: the selected tensors in layout order, then the probed-only ones in model order."""
        blocks = {name: list(self._selected_by_param[name]) for name in self._param_keep}
        for name in self._run.probed:
            block = self._blocks[name]
            blocks.setdefault(block.param, []).append(block)
        return blocks

    # ------------------------------------------------------------------ row-sparse embedding and head gradients
    # (rows.py: attach_row_gradients routes them here; public: row_gradients_supported, row_gradient_candidates,
    # row_gradient_names, detach_row_gradients)
    routes_rows = True  # engines that shard or average gradients (zero.py, fsdp.py) take them dense

    def row_gradients_supported(self) -> bool:
        """Whether :func:`~blockllm_factory.optim.rows.attach_row_gradients` may route gradients to this optimizer:
        one process (no cross-rank averaging) with compact gradients."""
        return type(self).routes_rows and self._carrier is not None and self._averager is None

    def row_gradient_candidates(self) -> list[str]:
        """The eligible embedding and head weights split into row blocks (``include_embeddings`` with row-group
        blocks): the tensors a row route can serve."""
        return [
            name
            for name in self.eligible_params
            if is_embedding_name(name) and self._param_by_name[name].dim() == 2 and len(self._param_blocks[name]) > 1
        ]

    @property
    def row_gradient_names(self) -> list[str]:
        """The weights whose gradients reach BlockLLM as rows (rows.py) rather than through autograd's ``.grad``."""
        return list(self._row_routes)

    def detach_row_gradients(self) -> None:
        """Gives the routed modules their own forward back: their weights' gradients go through autograd again."""
        for route in self._row_routes.values():
            route.detach()
        self._row_routes = {}

    def _flush_rows(self) -> None:
        for route in self._row_routes.values():
            route.flush()

    def _selected_rows(self, name: str) -> list[int]:
        """The rows of ``name``'s selected blocks, in increasing order (what a row route keeps of its gradient)."""
        cols = self._param_by_name[name].shape[1]
        rows: list[int] = []
        for start, stop in _ranges(self._selected_by_param.get(name, [])):
            rows.extend(range(start // cols, stop // cols))
        return rows

    def _receive_rows(self, name: str, row_sq: torch.Tensor, values: torch.Tensor) -> None:
        """A row route's gradient of ``name`` (one backward's): every row's squared norm (``row_sq``) and the rows of
        its selected blocks (``values``, in increasing order). Measured and compacted as :meth:`_compact_gradient`
        and the probe hook do with a dense gradient."""
        cols = self._param_by_name[name].shape[1]
        blocks = self._param_blocks[name]
        equal, rows = self._equal_row_groups[name], blocks[0].numel // cols
        squared = list(row_sq[: equal * rows].view(equal, rows).sum(dim=1).unbind(0))
        squared += [row_sq[block.start // cols : block.stop // cols].sum() for block in blocks[equal:]]
        for block_name, value in zip(self._block_names_of[name], squared):
            self.record_probe_norm(block_name, value)
        if name not in self._selected_by_param:
            self._carrier.flag_nonfinite_(row_sq.sum())
            return
        values = values.reshape(-1)
        param = self._param_by_name[name]
        state = self.state.get(param)
        if not state:  # a new selection: its mask is cut from these rows, as _cut_state cuts it from a whole gradient
            kept, offset = [], 0
            for block in sorted(self._selected_by_param[name], key=lambda block: block.start):
                kept.append((Block(block.name, name, offset, offset + block.numel), self._run.selected[block.name]))
                offset += block.numel
            mask = cut_mask(values, kept)
            if mask is None and self._mask_ranges(name) is not None:  # whole blocks, not the whole tensor
                mask = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
            state = {"step": 0}
            if mask is not None:
                state["mask"] = pack_mask(mask)
            del mask
            self._fill_state(name, state)
        kept = self._kept(name, state)  # its mask covers the selected rows, as ``values`` does
        self._carrier.add_(name, values if kept is None else values[kept.mask])

    def _release_compact_gradients(self) -> None:
        if self._carrier is not None:
            self._carrier.release()

    # ------------------------------------------------------------------ selection
    def _reselect(self, reason: str) -> None:
        keep, budget = reserve_blocks(self.always_selected, self._sizes, self.budget)
        always = set(self.always_selected)
        candidates = [name for name in self.block_names if name not in always]
        if budget > 0 and candidates:
            ranked = rank_blocks(self._run.norms, self._run.visits, candidates, self._sizes, self.score)
            # coverage c > 1 picks c budgets' worth of blocks; split_budget keeps the top 1/c of each,
            # threshold_budget what lies above one |g| threshold over them (estimated from their norms).
            picked = pick_blocks(ranked, self._sizes, math.ceil(budget * self.coverage))
            if self.keep == "threshold":
                keep.update(threshold_budget(picked, self._sizes, self._run.norms, budget))
            else:
                keep.update(split_budget(picked, self._sizes, budget))
        # Model order within the selection (the pick order is the rank order): states and logs follow the model.
        keep = {name: keep[name] for name in self.block_names if name in keep}
        # The optimizer is reset with the new selection (paper, section 2.2): old moments and masters are dropped.
        for name in self._selected_by_param:
            self.state.pop(self._param_by_name[name], None)
        self._flat = None
        self._run.selected = keep
        for name in keep:
            self._run.visits[name] += 1
        self._run.losses.clear()
        if self.selection_events:
            self._run.reselections += 1
        self.selection_events.append(
            {
                "step": self._run.step,
                "names": list(keep),
                "coordinates": sum(keep.values()),
                "reason": reason,
            }
        )

    def _next_probe(self) -> list[str]:
        unselected = [name for name in self.block_names if name not in self._run.selected]
        if self._run.reselect_after_probe:
            return unselected
        # Blocks of a tensor with selected blocks are measured anyway (its whole gradient is computed): sample others.
        selected_params = {self._blocks[name].param for name in self._run.selected}
        candidates = [name for name in unselected if self._blocks[name].param not in selected_params] or unselected
        if self.probe != "sample" or not candidates or self.probe_blocks == 0:
            return []
        count = min(self.probe_blocks, len(candidates))
        order = torch.randperm(len(candidates), generator=self._run.generator)[:count].tolist()
        return [candidates[index] for index in sorted(order)]

    def _set_trainable(self, probed: list[str]) -> None:
        """Makes exactly the selection and the probed blocks require grad; hooks turn probed gradients into norms."""
        for handle in self._probe_handles:
            handle.remove()
        self._probe_handles = []
        self._kept_for_scaler = None
        self._run.probed = list(probed)
        self._selected_by_param = {}
        for name in self._run.selected:
            block = self._blocks[name]
            self._selected_by_param.setdefault(block.param, []).append(block)
        keeps = {
            name: sum(self._run.selected[block.name] for block in blocks)
            for name, blocks in self._selected_by_param.items()
        }
        # Layout of the flat states and of the compact gradients: tensors that share a class (flat.py) are adjacent,
        # in model order within it.
        keys = {name: self._layout_key(name, keep) for name, keep in keeps.items()}
        self._param_keep = {name: keeps[name] for name in sorted(keeps, key=lambda name: keys[name].order())}
        offset = 0
        slots = {}
        for name, keep in self._param_keep.items():
            slots[name] = Slot(key=keys[name], start=offset, keep=keep)
            offset += keep
        if self._carrier is not None:
            self._carrier.arrange({name: (slot.start, slot.keep) for name, slot in slots.items()})
        if slots != self._slots:  # a new selection, or a load: new flat buffers on first use
            self._slots = slots
            self._flat = None
        probe_only = self.probe_only_parameters()
        if self._averager is not None:
            self._averaged_kept = self._kept_only()
            ranges = {
                name: [(0, self._param_keep[name])] if name in self._averaged_kept else _ranges(blocks)
                for name, blocks in self._averaged_blocks().items()
            }
            self._averager.arrange(ranges)
        trainable = set(self._selected_by_param) | probe_only
        for name, param in self._param_by_name.items():
            param.requires_grad_(name in trainable)
            if name not in trainable:
                param.grad = None
        if self.compact_gradients:
            for name in self._selected_by_param:
                self._probe_handles.append(
                    self._param_by_name[name].register_post_accumulate_grad_hook(_compact_hook(self, name))
                )
        if self.probe_hooks:
            for name in self.eligible_params:
                if name in probe_only:
                    self._probe_handles.append(
                        self._param_by_name[name].register_post_accumulate_grad_hook(_probe_hook(self, name))
                    )
        self._arrange_trainable([name for name in self.eligible_params if name in trainable])

    def _arrange_trainable(self, trainable: list[str]) -> None:
        """Extension point: the tensors that require grad from now on (``trainable``, in model order: those with
        selected blocks and the probed ones) have just been set, after a selection, a probe draw or a load. An engine
        that keeps buffers for the trainable tensors only (ZeRO-3's partitions, zero.py) rearranges them here; one
        process and DDP keep nothing per trainable tensor."""

    # ------------------------------------------------------------------ checkpointing (public: state_dict, run_state,
    # load_state_dict)
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the run state under ``"blockllm"`` (see :meth:`run_state`), added by BlockLLM's
        own post-hook, which runs before any hook registered with ``register_state_dict_post_hook``: those see the
        whole state.

        Extension point: a subclass that keeps its per-parameter states elsewhere builds its own dict with
        :meth:`_state_dict_through_hooks` (so that torch's hooks and the run state see it too) and reads it back in
        :meth:`_unpack_state_dict`."""
        return super().state_dict()

    def _state_dict_through_hooks(self, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``build()``'s dict with torch's state_dict pre-hooks run before and its post-hooks (BlockLLM's first) after,
        as ``Optimizer.state_dict`` runs them around its own dict."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = build()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def run_state(self) -> dict[str, Any]:
        """Everything but the per-block tensors: selection, probes, norm table, losses, counters, generator (the
        fields of :class:`~blockllm_factory.optim.run_state.RunState`)."""
        return self._run.to_dict()

    def _shape(self, name: str) -> tuple[int, ...]:
        param = self._param_by_name[name]
        return tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition's full shape

    def _load_run_state(self, run: dict[str, Any]) -> None:
        self._run.load_dict(run)
        self._pending_losses = []
        self._probe_sq_norms = {}
        self._premeasured_sq_norms = {}
        self._release_compact_gradients()
        self._flat = None  # the loaded states are copied into new flat buffers on first use
        self._set_trainable(probed=list(self._run.probed))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict`, through torch's ``Optimizer.load_state_dict``.

        Hooks registered with ``register_load_state_dict_pre_hook`` see (and may replace) the dict as saved; those
        registered with ``register_load_state_dict_post_hook`` see the optimizer fully restored. BlockLLM's own part
        runs as the last pre-hook and the first post-hook: torch is handed the groups' settings only (it would cast
        every state tensor to its parameter's dtype, and BlockLLM keeps fp32 moments and uint8 masks next to bf16
        weights), and the states and the run state are restored right after it.
        """
        prepare = self.register_load_state_dict_pre_hook(_prepare_load)
        finish = self.register_load_state_dict_post_hook(_finish_load, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            prepare.remove()
            finish.remove()
            self._loading = None

    def _unpack_state_dict(
        self, state_dict: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[torch.nn.Parameter, dict[str, Any]]]:
        """Extension point: from a dict saved by :meth:`state_dict` (its run state already checked), the settings of
        each group of ``param_groups`` in order (without ``"params"``) and every parameter's state, on its device."""
        # The gradient carrier's group holds no state: a run may resume with compact gradients switched on or off.
        saved_groups = [group for group in state_dict["param_groups"] if not is_carrier_group(group)]
        groups = [group for group in self.param_groups if not is_carrier_group(group)]
        if len(saved_groups) != len(groups):
            raise ValueError("Invalid state_dict: the number of parameter groups differs")
        index_to_param: dict[int, torch.nn.Parameter] = {}
        saved_for: dict[int, dict[str, Any]] = {}
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("Invalid state_dict: a parameter group has a different size")
            index_to_param.update(zip(saved["params"], group["params"]))
            saved_for[id(group)] = saved
        settings = [
            _group_settings(group, saved_for.get(id(group), {})) for group in self.param_groups
        ]  # the carrier's group keeps its own
        # States keep their own dtypes (fp32 moments and masters next to bf16 weights): no casting to the param dtype.
        states = {}
        for index, saved_state in state_dict["state"].items():
            param = index_to_param[int(index)]
            states[param] = {
                key: value.to(param.device) if torch.is_tensor(value) else value for key, value in saved_state.items()
            }
        return settings, states


def _add_run_state(optimizer: BlockLLM, state_dict: dict[str, Any]) -> None:
    """BlockLLM's first post-hook of torch's state_dict: the run state joins the dict before other hooks see it."""
    state_dict[RUN_STATE_KEY] = optimizer.run_state()


def _group_settings(group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """A group's settings after loading: the saved ones over the current ones; the parameters' names stay."""
    settings = {key: value for key, value in group.items() if key != "params"}
    settings.update((key, value) for key, value in saved.items() if key not in ("params", "param_names"))
    return settings


def _prepare_load(optimizer: BlockLLM, state_dict: dict[str, Any]) -> dict[str, Any]:
    """BlockLLM's pre-hook of torch's load_state_dict: checks the dict, keeps its states aside, and hands torch the
    groups' settings with placeholder parameter ids (torch maps them onto ``param_groups`` as they are)."""
    run = optimizer._run.check_dict(state_dict.get(RUN_STATE_KEY))
    settings, states = optimizer._unpack_state_dict(state_dict)
    _check_finite(optimizer, states)
    optimizer._loading = (states, run)
    groups, first = [], 0
    for group, saved in zip(optimizer.param_groups, settings):
        groups.append({**saved, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    return {"state": {}, "param_groups": groups}


def _check_finite(optimizer: BlockLLM, states: dict[torch.nn.Parameter, dict[str, Any]]) -> None:
    """Every floating-point tensor of the per-parameter states (moments, masters, scales), whatever their layout, is
    finite: a damaged file or a diverged run is refused before anything is restored."""
    names = {id(param): name for name, param in optimizer.param_by_name.items()}
    for param, state in states.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                where = names.get(id(param), "a parameter group's states")
                raise ValueError(
                    f"Invalid state_dict: the optimizer state {key!r} of {where} holds non-finite values (a damaged "
                    "file, or a run that had diverged when it was saved)"
                )


def _finish_load(optimizer: BlockLLM) -> None:
    """BlockLLM's first post-hook of torch's load_state_dict: the per-parameter states and the run state."""
    states, run = optimizer._loading
    optimizer._loading = None
    optimizer.state.update(states)
    optimizer._load_run_state(run)
    optimizer._repack_whole_tensor_masks()


def _ranges(blocks: list[Block]) -> list[tuple[int, int]]:
    """The flat coordinate ranges of ``blocks`` (of one tensor, in order), adjacent ones merged."""
    return [(start, stop) for start, stop, _ in _kept_spans(blocks, {})]


def _kept_spans(blocks: list[Block], kept: Mapping[str, int]) -> list[tuple[int, int, int]]:
    """:func:`_ranges` with the coordinates each range keeps (``kept``: block name -> its kept count; 0 if absent)."""
    spans: list[tuple[int, int, int]] = []
    for block in sorted(blocks, key=lambda block: block.start):
        count = kept.get(block.name, 0)
        if spans and spans[-1][1] == block.start:
            spans[-1] = (spans[-1][0], block.stop, spans[-1][2] + count)
        else:
            spans.append((block.start, block.stop, count))
    return spans


def _probe_hook(optimizer: BlockLLM, name: str) -> Callable[[torch.Tensor], None]:
    """Records the squared gradient norms of a probed tensor's blocks and frees the gradient right away.

    Under gradient accumulation the hook runs once per micro-step, so the recorded value is the sum of the
    micro-steps' squared norms (see docs/algorithm.md). A weak reference keeps the model from owning the optimizer.
    """
    optimizer_ref = weakref.ref(optimizer)

    def hook(param: torch.Tensor) -> None:
        owner = optimizer_ref()
        if owner is None or param.grad is None or owner._keeps_gradient_for_scaler(name):
            return
        if owner._averager is not None:  # measured once averaged across ranks (reduce_gradients)
            owner._averager.add_(name, param.grad)
            param.grad = None
            return
        squared_norm = owner.record_gradient_norms(name, param.grad)
        if owner.compact_gradients:
            owner._carrier.flag_nonfinite_(squared_norm)
        param.grad = None

    return hook


def _compact_hook(optimizer: BlockLLM, name: str) -> Callable[[torch.Tensor], None]:
    """Cuts a selected block's freshly accumulated gradient down to its masked coordinates (see compact_gradients)."""
    optimizer_ref = weakref.ref(optimizer)

    def hook(param: torch.Tensor) -> None:
        owner = optimizer_ref()
        if owner is not None and param.grad is not None:
            owner._compact_gradient(name, param)

    return hook

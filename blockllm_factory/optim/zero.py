"""BlockLLM inside DeepSpeed ZeRO stage 1, 2 and 3: :class:`ZeroBlockLLM`, the client optimizer DeepSpeed wraps.

How DeepSpeed drives a client optimizer: it flattens the trainable parameters of each parameter group, gives every rank
one slice of that flat buffer as an fp32 master partition, reduces the gradients into the matching slice, and calls the
client's ``step()`` with ``param_groups[i]["params"] = [that fp32 partition]`` and the reduced (unscaled, clipped)
gradient in its ``.grad``. It then copies the partition back into the model weights and all-gathers them (ZeRO-1/2), or
keeps the partition as the rank's shard of each parameter (ZeRO-3). A parameter may therefore lie partly on one rank
and partly on another, and under ZeRO-3 no rank ever holds a whole parameter outside forward and backward.

:class:`ZeroBlockLLM` keeps BlockLLM's decisions (norm table, patience rule, selection, probes, all identical on every
rank, see distributed.py) and runs its measurement and update on *fragments*: the part of each block that lies in this
rank's partition, found through DeepSpeed's own lp-to-hp mapping (``param._hp_mapping`` for ZeRO-1/2, the partition
layout of ``param._z3_optimizer`` for ZeRO-3).

* Norms: the squared norm of each trainable block's fragment and the fragment's share of the block; the all-reduce sums
  them into the exact norm of the averaged gradient. DeepSpeed owns the gradients of the tensors in its partitions, so
  BlockLLM's own probe hooks are off (under ZeRO-3 the probed tensors outside the partitions get this module's).
* Masks: when a block is newly selected, the top-k mask needs the whole block gradient once. Every rank writes its
  fragment into a zero buffer of the new blocks and one all-reduce (sum) gives every rank the same full gradient
  (each coordinate is one rank's value plus zeros, so it is bit-identical everywhere), and so the same mask. The mask
  (one bit per coordinate) is kept whole; Adam moments exist only for the selected coordinates of this rank's
  fragment.
  With ``optim_bits=8`` those moments are block-wise 8-bit (quantization.py), quantised per fragment and decoded for
  the fragment's update only, as in one process.
* Update: masked AdamW on the fragment of the fp32 partition, in place; DeepSpeed propagates it to the model weights.
  DeepSpeed's fp32 partition is the master copy, so BlockLLM keeps no master of its own here.
* DeepSpeed must call ``step()`` once per optimizer step, so the optimizer shows it one parameter group (weight decay
  stays per block) and, under ZeRO-3, DeepSpeed must not cut that group into sub-groups (``sub_group_size`` at least
  the number of trainable parameters, checked on the first step).
* Without ``partitions``: parameters are registered with DeepSpeed once, when it wraps the model: every eligible block
  requires grad then (the first step probes them all). Afterwards BlockLLM only flips ``requires_grad``; DeepSpeed
  reduces the gradients that were produced and gives zeros for the rest, which the optimizer never reads.
* With ``partitions`` (a :class:`PartitionRebuilder`; ZeRO-1/2/3 in the harness): the engine's partitions hold only
  the tensors with selected blocks (before the first selection, one placeholder: the smallest tensor), rebuilt through
  ``partitions.rebuild`` from the extension point ``_arrange_trainable`` whenever the selection changes or a state is
  loaded. Probed tensors outside the partitions are measured by this optimizer's own hooks (each gradient
  reduce-scattered into this rank's slice), and a checkpoint names the partition and, where the engine's checkpoint
  holds only its partitions' weights (ZeRO-3), keeps this rank's weight shards of the tensors trained earlier.
* Checkpoints: DeepSpeed saves each rank's ``state_dict()`` in its own file; it holds the run state (the same on every
  rank) and this rank's fragment states, and is loaded on a run with the same number of ranks.

Nothing here imports DeepSpeed: it reads the attributes DeepSpeed sets on the parameters.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .blockllm import BlockLLM
from .distributed import assemble_whole, check_saved_rank, rank_and_world
from .functional import masked_adamw_
from .masks import pack_mask, unpack_mask
from .quantization import decode_moments_into, encode_moments_from, quantized, zero_moments_
from .selection import Block, cut_mask
from .settings import invalid_value

ZERO_STATE_KEY = "blockllm_zero"


class PartitionRebuilder(Protocol):
    """What an engine that can rebuild its partitions offers ZeroBlockLLM (DeepSpeed ZeRO-3:
    ``blockllm_factory/hf/zero3.py``; ZeRO-1/2: ``blockllm_factory/hf/zero12.py``). The engine keeps fp32 master and
    gradient partitions only for the parameters last handed to :meth:`rebuild`; every other parameter is a frozen
    weight to it (its shard of the weights under ZeRO-3, the whole weight under ZeRO-1/2)."""

    checkpoints_all_weights: bool
    """Whether the engine's checkpoint holds the weights of every parameter (ZeRO-1/2); if not (ZeRO-3: only those in
    its partitions), ZeroBlockLLM's state keeps this rank's :meth:`shard` of the tensors trained earlier."""

    def rebuild(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """From now on the partitions hold exactly ``params`` (same order on every rank; called on every rank alike).
        The weights of the parameters leaving them carry their last update; those that stay keep their fp32 values."""

    def shard(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's stored part of a parameter's weights (flat, in the weights' dtype): a view, written in place
        when a checkpoint is loaded."""

    def shards_written(self, params: list[torch.nn.Parameter]) -> None:
        """After :meth:`shard` views were written: whatever the engine derives from the shards is refreshed."""


@dataclass(frozen=True)
class Fragment:
    """The part of a block in this rank's flat fp32 partition: coordinates [block_start, block_start + numel) of the
    flattened block sit at [partition_start, partition_start + numel) of the partition."""

    block_start: int
    numel: int
    partition_start: int


def find_fragment(param: torch.nn.Parameter) -> Fragment | None:
    """This rank's fragment of a parameter wrapped by a DeepSpeed ZeRO optimizer (None: no coordinate here)."""
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: DeepSpeed's lp-to-hp fragment mapping
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return Fragment(
            block_start=int(mapping.lp_fragment_address.start),
            numel=int(mapping.lp_fragment_address.numel),
            partition_start=int(mapping.hp_fragment_address.start),
        )
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is not None:  # ZeRO-3: rank r holds coordinates [r * p, (r + 1) * p) of every parameter, p padded
        sub_group, offset, partition_numel = optimizer.grad_position[optimizer.get_param_id(param)]
        if sub_group != 0:
            raise RuntimeError(
                "BlockLLM needs DeepSpeed ZeRO-3 to keep all trainable parameters in one sub-group: raise "
                "`zero_optimization.sub_group_size` in the DeepSpeed config to at least the number of trainable "
                "parameters (e.g. 1e12)."
            )
        rank = optimizer._get_param_partition_rank(param) if hasattr(optimizer, "_get_param_partition_rank") else None
        if rank is None:
            rank = rank_and_world()[0]
        start = int(rank) * int(partition_numel)
        numel = max(0, min(int(partition_numel), int(param.ds_numel) - start))
        return Fragment(block_start=start, numel=numel, partition_start=int(offset)) if numel else None
    raise RuntimeError(
        "ZeroBlockLLM.step() was called on a parameter that no DeepSpeed ZeRO optimizer manages; use BlockLLM "
        "outside DeepSpeed ZeRO."
    )


class ZeroBlockLLM(BlockLLM):
    """BlockLLM for DeepSpeed ZeRO-1/2/3 (pass it to ``deepspeed.initialize`` as the client optimizer).

    Same arguments and decisions as :class:`BlockLLM`, plus ``max_grad_norm``: gradient clipping over the selected
    blocks, done here because DeepSpeed's own clipping would also count the probed blocks' gradients, which it reduces
    for the norm table (set DeepSpeed's ``gradient_clipping`` to 0). The clipping is that of
    ``torch.nn.utils.clip_grad_norm_`` on the selection, as the Trainer does in one process, where the probe hooks have
    freed the probed gradients before it clips.
    """

    routes_rows = False  # gradients of sharded weights come through the engine, whole

    def __init__(
        self,
        params,
        max_grad_norm: float = 0.0,
        partitions: PartitionRebuilder | None = None,
        micro_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        self._partitions: PartitionRebuilder | None = None  # set after BlockLLM's set-up (which arranges once)
        if not max_grad_norm >= 0.0:
            raise invalid_value("max_grad_norm", "a number >= 0 (0: no clipping)", max_grad_norm)
        if not (isinstance(micro_steps, int) and micro_steps >= 1):
            raise invalid_value("micro_steps", "an integer >= 1 (backward passes per optimizer step)", micro_steps)
        # What DeepSpeed's partitions cannot serve, refused before BlockLLM's own checks (settings.py).
        if kwargs.get("compact_gradients"):
            raise invalid_value(
                "compact_gradients",
                "false under DeepSpeed ZeRO (DeepSpeed owns the gradient buffers)",
                kwargs["compact_gradients"],
            )
        kwargs["compact_gradients"] = False
        if kwargs.get("block_size", 0) != 0:
            raise invalid_value(
                "block_size",
                "0 (whole tensors) under DeepSpeed ZeRO (row-group blocks are not served there)",
                kwargs["block_size"],
            )
        if kwargs.get("master", "fp32") != "fp32":
            raise invalid_value(
                "master",
                "fp32 under DeepSpeed ZeRO (DeepSpeed's fp32 partition is the master copy)",
                kwargs["master"],
            )
        super().__init__(params, **kwargs)
        self.max_grad_norm = float(max_grad_norm)
        self.set_probe_hooks(False)  # DeepSpeed consumes the gradients; norms come from its partitions
        self._fragments: dict[str, Fragment | None] | None = None
        # With ``partitions``: the engine's partitions hold the tensors with selected blocks only; probed
        # tensors outside them are measured by this optimizer's hooks (reduce-scattered, this rank's slice kept).
        self._probe_handles_outside: list[Any] = []
        # name -> [this rank's summed slice (its squared norm after the step's last micro-step), numel, micro-steps]
        self._probe_slices: dict[str, list[Any]] = {}
        self.micro_steps = micro_steps
        self._pending_shards: dict[str, torch.Tensor] = {}
        self._partition_names: list[str] = []
        if partitions is not None:
            self._partitions = partitions
            sizes = self.block_sizes
            # Nothing is selected before the first step, but the engine needs a partition to call step() on: the
            # smallest tensor, probed there like the others.
            self._placeholder = min(self.block_names, key=lambda name: sizes[name])
            self._arrange_trainable(list(self.probed_blocks))

    @property
    def partitions(self) -> PartitionRebuilder | None:
        """The engine's rebuild of its partitions (None: the engine keeps partitions of every trainable tensor)."""
        return self._partitions

    @property
    def partition_names(self) -> list[str]:
        """The tensors the engine's partitions hold (all trainable tensors without ``partitions``)."""
        if self._partitions is None:
            return list(self.block_names)
        return list(self._partition_names)

    def _arrange_groups(self, groups: list[dict[str, Any]], defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """One parameter group for DeepSpeed (one step() call per optimizer step); weight decay stays per block."""
        self._weight_decay: dict[str, float] = {
            name: float(group.get("weight_decay", defaults["weight_decay"]))
            for group in groups
            for name, _ in group["params"]
        }
        unmerged = ("params", "param_names", "weight_decay")
        merged = {key: value for key, value in groups[0].items() if key not in unmerged}
        merged["params"] = [entry for group in groups for entry in group["params"]]
        merged["weight_decay"] = 0.0  # unused: see _weight_decay
        return [merged]

    @staticmethod
    def _block_numel(param: torch.nn.Parameter) -> int:
        return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 leaves numel() == 0 on partitioned weights

    # ------------------------------------------------------------------ partition access
    def _partition(self) -> torch.Tensor:
        params = self.param_groups[0]["params"]
        if len(params) != 1 or params[0].grad is None:
            raise RuntimeError(
                "ZeroBlockLLM.step() expects DeepSpeed's flat fp32 partition with its gradient (one parameter group); "
                "it was called outside a DeepSpeed ZeRO optimizer step."
            )
        return params[0]

    def fragments(self) -> dict[str, Fragment | None]:
        """This rank's fragment of every tensor in the engine's partitions."""
        if self._fragments is None:
            params = self.param_by_name
            self._fragments = {name: find_fragment(params[name]) for name in self.partition_names}
        return self._fragments

    # ------------------------------------------------------------------ partitions of the selection only
    def _arrange_trainable(self, trainable: list[str]) -> None:
        """Under ``partitions``: the engine's partitions are rebuilt to hold the tensors with selected blocks (whole
        tensors under DeepSpeed: block names are tensor names), and probed tensors outside them get this optimizer's
        measuring hooks."""
        if self._partitions is None:
            return
        params = self.param_by_name
        selected = self.kept_coordinates
        wanted = [name for name in trainable if name in selected] or [self._placeholder]
        for name in wanted:
            params[name].requires_grad_(True)
        if wanted != self._partition_names:
            if self._partition_names:
                self._partitions.rebuild({name: params[name] for name in wanted})
            else:  # before the engine exists: it builds its partitions from the parameter group
                self.param_groups[0]["params"] = [params[name] for name in wanted]
                self.param_groups[0]["param_names"] = list(wanted)
            self._partition_names = wanted
            self._fragments = None
        if self._pending_shards:  # a load: the weights of tensors trained earlier, outside the rebuilt partitions
            shards, self._pending_shards = self._pending_shards, {}
            for name, values in shards.items():
                self._partitions.shard(params[name]).copy_(values)
            self._partitions.shards_written([params[name] for name in shards])
        for handle in self._probe_handles_outside:
            handle.remove()
        self._probe_handles_outside = []
        self._probe_slices.clear()
        for name in self.probed_blocks:
            if name not in wanted:
                hook = _probe_slice_hook(self._probe_slices, name, self.micro_steps)
                self._probe_handles_outside.append(params[name].register_post_accumulate_grad_hook(hook))

    # ------------------------------------------------------------------ measurement and update on fragments
    def _measure(self) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, list[str]]:
        partition = self._partition()
        fragments = self.fragments()
        sizes = self.block_sizes
        selected = list(self.kept_coordinates)
        squared_norms: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        world = rank_and_world()[1]
        probed_outside = dict(self._probe_slices)
        self._probe_slices.clear()  # the hooks hold this dict
        for name in dict.fromkeys([*selected, *self.probed_blocks]):
            if name in probed_outside:  # the summed slice of this rank, averaged over ranks as DeepSpeed averages
                values, numel, _ = probed_outside[name]
                squared_norms[name] = _squared_norm(values) / world**2
                shares[name] = numel / sizes[name]
                continue
            fragment = fragments.get(name)
            if fragment is None:
                continue
            grad = partition.grad.narrow(0, fragment.partition_start, fragment.numel)
            state = self.state.get(self.param_by_name[name])
            if state and "mask" in state:  # measured on its kept coordinates, as under DDP (distributed.py)
                grad = grad[unpack_mask(state["mask"], sizes[name]).narrow(0, fragment.block_start, fragment.numel)]
            squared_norms[name] = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            shares[name] = fragment.numel / sizes[name]
        # Every selected block takes part in the update (and in the collective that cuts new masks), fragment or not.
        return squared_norms, shares, selected

    def _apply_updates(self, selected_names: list[str]) -> None:
        partition = self._partition()
        fragments = self.fragments()
        params, sizes = self.param_by_name, self.block_sizes
        new = [name for name in selected_names if not self.state.get(params[name])]
        self._init_states(new, partition, fragments)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        clip = self._clip_coefficient(selected_names)
        if clip is not None:
            # As in one process, where the Trainer clips before the optimizer measures, the norm table holds the
            # selected blocks' norms after clipping (the probed ones are never clipped).
            self.rescale_norms(selected_names, clip)
        for name in selected_names:
            state = self.state[params[name]]
            state["step"] += 1
            fragment = fragments[name]
            if fragment is None:
                continue
            mask = None
            if "mask" in state:
                mask = unpack_mask(state["mask"], sizes[name]).narrow(0, fragment.block_start, fragment.numel)
            grad = partition.grad.narrow(0, fragment.partition_start, fragment.numel)
            if clip is not None:
                grad.mul_(clip)
            eight_bit = "exp_avg_q" in state
            if eight_bit:  # decoded for this fragment's update only; the codes are what stays between steps
                local = state["exp_avg_q"].numel()
                exp_avg = torch.empty(local, dtype=torch.float32, device=grad.device)
                exp_avg_sq = torch.empty(local, dtype=torch.float32, device=grad.device)
                decode_moments_into(state, exp_avg, exp_avg_sq)
            else:
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            masked_adamw_(
                partition.data.narrow(0, fragment.partition_start, fragment.numel),
                grad,
                exp_avg,
                exp_avg_sq,
                mask,
                None,
                step=state["step"],
                lr=self.update_lr(group, state["step"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=self._weight_decay[name],
            )
            if eight_bit:
                encode_moments_from(state, exp_avg, exp_avg_sq)

    def _clip_coefficient(self, selected_names: list[str]) -> float | None:
        """torch's clip_grad_norm_ factor for the selected blocks, from the norms all ranks agreed on this step."""
        if self.max_grad_norm <= 0.0 or not selected_names:
            return None
        norms = self.norm_table
        total = math.sqrt(sum(norms[name] ** 2 for name in selected_names))
        return min(1.0, self.max_grad_norm / (total + 1e-6))

    def _init_states(self, names: list[str], partition: torch.Tensor, fragments: dict[str, Fragment | None]) -> None:
        """Masks from the whole averaged gradient of newly selected blocks (one all-reduce), then compact moments."""
        sizes, kept, params = self.block_sizes, self.kept_coordinates, self.param_by_name
        masked = [name for name in names if kept[name] < sizes[name]]
        full_grads: dict[str, torch.Tensor] = {}
        if masked:
            pieces = [
                (index, fragment.block_start, partition.grad.narrow(0, fragment.partition_start, fragment.numel))
                for index, fragment in enumerate(fragments[name] for name in masked)
                if fragment is not None
            ]
            whole = assemble_whole([sizes[name] for name in masked], pieces, partition.device)
            full_grads = dict(zip(masked, whole))
        for name in names:
            fragment = fragments[name]
            local = 0 if fragment is None else fragment.numel
            state: dict[str, Any] = {"step": 0}
            if name in full_grads:
                mask = cut_mask(full_grads[name], [(Block(name, name, 0, sizes[name]), kept[name])])  # whole tensors
                state["mask"] = pack_mask(mask)
                if fragment is not None:
                    local = int(mask.narrow(0, fragment.block_start, fragment.numel).sum())
            if self.optim_bits == 8 and quantized(local):
                # Quantised per fragment: bitsandbytes' blocks of 256 start at this rank's first selected coordinate
                # of the block, so the codes (not the decisions) differ from one process's.
                zero_moments_(state, local, partition.device)
            else:
                state["exp_avg"] = torch.zeros(local, dtype=torch.float32, device=partition.device)
                state["exp_avg_sq"] = torch.zeros(local, dtype=torch.float32, device=partition.device)
            self.state[params[name]] = state

    # ------------------------------------------------------------------ checkpointing (one file per rank)
    def state_dict(self) -> dict[str, Any]:
        """This rank's fragment states and the run state, with torch's state_dict hooks run around them."""
        return self._state_dict_through_hooks(self._fragment_state_dict)

    def _fragment_state_dict(self) -> dict[str, Any]:
        rank, world = rank_and_world()
        params = self.param_by_name
        blocks = {name: dict(self.state[params[name]]) for name in self.block_names if self.state.get(params[name])}
        group = {key: value for key, value in self.param_groups[0].items() if key not in ("params", "param_names")}
        zero: dict[str, Any] = {"blocks": blocks, "rank": rank, "world_size": world}
        if self._partitions is not None:
            # The engine's checkpoint holds its partitions (the selected tensors); the weights of tensors trained
            # earlier and frozen since are this rank's shards, saved here (and the partition, rebuilt on load).
            # ZeRO-1/2 keep whole weights, all of them in the engine's checkpoint: no shards to save.
            zero["partition"] = list(self._partition_names)
            outside = []
            if not self._partitions.checkpoints_all_weights:
                trained = {name for event in self.selection_events for name in event["names"]}
                outside = [name for name in self.block_names if name in trained and name not in self._partition_names]
            zero["shards"] = {name: self._partitions.shard(params[name]).clone() for name in outside}
        return {
            "state": {},
            "param_groups": [{**group, "params": []}],
            ZERO_STATE_KEY: zero,
        }

    def _unpack_state_dict(
        self, state_dict: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[torch.nn.Parameter, dict[str, Any]]]:
        zero = state_dict.get(ZERO_STATE_KEY)
        if zero is None:
            raise ValueError("Invalid state_dict: it was not saved by ZeroBlockLLM (no fragment states)")
        check_saved_rank(zero["rank"], zero["world_size"], "DeepSpeed ZeRO")
        if ("partition" in zero) != (self._partitions is not None):
            raise ValueError(
                "Invalid state_dict: saved with DeepSpeed ZeRO partitions of "
                f"{'the selection only' if 'partition' in zero else 'every trainable tensor'}, loaded with "
                f"{'the selection only' if self._partitions is not None else 'every trainable tensor'}; resume "
                "with the same ZeRO stage and blockllm-factory version"
            )
        self._pending_shards = dict(zero.get("shards", {}))
        # DeepSpeed's flat partition stays the group's parameter; the saved settings (lr, ...) replace the current.
        saved = state_dict["param_groups"][0]
        settings = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        settings.update((key, value) for key, value in saved.items() if key not in ("params", "param_names"))
        params = self.param_by_name
        device = next(iter(params.values())).device
        states = {
            params[name]: {
                key: value.to(device) if torch.is_tensor(value) else value for key, value in block_state.items()
            }
            for name, block_state in zero["blocks"].items()
        }
        return [settings], states


def _squared_norm(values: torch.Tensor) -> torch.Tensor:
    """A slice's squared norm in fp32 (a 0-dim tensor already is one: the hook reduced it at the last micro-step)."""
    if values.dim() == 0:
        return values
    return torch.linalg.vector_norm(values, dtype=torch.float32).square()


def _probe_slice_hook(slices: dict[str, list[Any]], name: str, micro_steps: int = 1):
    """Post-accumulate-grad hook of a probed tensor outside the engine's partitions: its gradient is summed across
    ranks into this rank's slice (one reduce-scatter, as DeepSpeed reduces the gradients it owns), added to what the
    step's earlier micro-steps left there, and freed. Rank r keeps coordinates [r * p, (r + 1) * p), p = ceil(n /
    world). At the step's last micro-step (``micro_steps`` backward passes a step) the slice is reduced to its squared
    norm at once, so that a step probing many tensors (the first probes them all) holds one slice at a time rather
    than a slice of every probed tensor until the step; a tensor that got fewer gradients keeps its slice, and the
    step reduces it."""

    def hook(param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        if grad is None:
            return
        rank, world = rank_and_world()
        flat = grad.detach().reshape(-1)
        per_rank = -(-flat.numel() // world)
        numel = max(0, min(per_rank, flat.numel() - rank * per_rank))
        if world == 1:
            piece = flat.float()
        else:
            import torch.distributed as dist

            padded = torch.nn.functional.pad(flat, (0, per_rank * world - flat.numel()))
            piece = torch.empty(per_rank, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(piece, padded, op=dist.ReduceOp.SUM)
            piece = piece.float()
        held = slices.get(name)
        if held is None or held[0].dim() == 0:  # a reduced one is of a step that never reached step() (e.g. skipped)
            held = slices[name] = [piece if piece.data_ptr() != flat.data_ptr() else piece.clone(), numel, 0]
        else:
            held[0].add_(piece)
        held[2] += 1
        if held[2] == micro_steps:
            held[0] = _squared_norm(held[0])

    return hook

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
  them into the exact norm of the averaged gradient. DeepSpeed owns the gradients, so there are no probe hooks.
* Masks: when a block is newly selected, the top-k mask needs the whole block gradient once. Every rank writes its
  fragment into a zero buffer of the new blocks and one all-reduce (sum) gives every rank the same full gradient
  (each coordinate is one rank's value plus zeros, so it is bit-identical everywhere), and so the same mask. The mask
  (one bit per coordinate) is kept whole; Adam moments exist only for the selected coordinates of this rank's
  fragment.
* Update: masked AdamW on the fragment of the fp32 partition, in place; DeepSpeed propagates it to the model weights.
  DeepSpeed's fp32 partition is the master copy, so BlockLLM keeps no master of its own here.
* DeepSpeed must call ``step()`` once per optimizer step, so the optimizer shows it one parameter group (weight decay
  stays per block) and, under ZeRO-3, DeepSpeed must not cut that group into sub-groups (``sub_group_size`` at least
  the number of trainable parameters, checked on the first step).
* Parameters are registered with DeepSpeed once, when it wraps the model: every eligible block requires grad then (the
  first step probes them all). Afterwards BlockLLM only flips ``requires_grad``; DeepSpeed reduces the gradients that
  were produced and gives zeros for the rest, which the optimizer never reads.
* Checkpoints: DeepSpeed saves each rank's ``state_dict()`` in its own file; it holds the run state (the same on every
  rank) and this rank's fragment states, and is loaded on a run with the same number of ranks.

Nothing here imports DeepSpeed: it reads the attributes DeepSpeed sets on the parameters.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from .blockllm import BlockLLM
from .distributed import all_reduce_sum_, is_distributed
from .functional import masked_adamw_
from .masks import pack_mask, unpack_mask
from .settings import invalid_value

ZERO_STATE_KEY = "blockllm_zero"


@dataclass(frozen=True)
class Fragment:
    """The part of a block in this rank's flat fp32 partition: coordinates [block_start, block_start + numel) of the
    flattened block sit at [partition_start, partition_start + numel) of the partition."""

    block_start: int
    numel: int
    partition_start: int


def _rank_and_world() -> tuple[int, int]:
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
            rank = _rank_and_world()[0]
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

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        if not max_grad_norm >= 0.0:
            raise invalid_value("max_grad_norm", "a number >= 0 (0: no clipping)", max_grad_norm)
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
        if kwargs.get("optim_bits", 32) != 32:
            raise invalid_value(
                "optim_bits", "32 under DeepSpeed ZeRO (8-bit moments are not served there)", kwargs["optim_bits"]
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
        if self._fragments is None:
            params = self.param_by_name
            self._fragments = {name: find_fragment(params[name]) for name in self.block_names}
        return self._fragments

    # ------------------------------------------------------------------ measurement and update on fragments
    def _measure(self) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, list[str]]:
        partition = self._partition()
        fragments = self.fragments()
        sizes = self.block_sizes
        selected = list(self.kept_coordinates)
        squared_norms: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        for name in dict.fromkeys([*selected, *self.probed_blocks]):
            fragment = fragments[name]
            if fragment is None:
                continue
            grad = partition.grad.narrow(0, fragment.partition_start, fragment.numel)
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
            masked_adamw_(
                partition.data.narrow(0, fragment.partition_start, fragment.numel),
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                mask,
                None,
                step=state["step"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=self._weight_decay[name],
            )

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
            buffer = torch.zeros(sum(sizes[name] for name in masked), dtype=torch.float32, device=partition.device)
            offset = 0
            for name in masked:
                fragment = fragments[name]
                if fragment is not None:
                    buffer.narrow(0, offset + fragment.block_start, fragment.numel).copy_(
                        partition.grad.narrow(0, fragment.partition_start, fragment.numel)
                    )
                full_grads[name] = buffer.narrow(0, offset, sizes[name])
                offset += sizes[name]
            all_reduce_sum_(buffer)
        for name in names:
            fragment = fragments[name]
            local = 0 if fragment is None else fragment.numel
            state: dict[str, Any] = {"step": 0}
            if name in full_grads:
                mask = torch.zeros(sizes[name], dtype=torch.bool, device=partition.device)
                mask[torch.topk(full_grads[name].abs(), kept[name], sorted=False).indices] = True
                state["mask"] = pack_mask(mask)
                if fragment is not None:
                    local = int(mask.narrow(0, fragment.block_start, fragment.numel).sum())
            state["exp_avg"] = torch.zeros(local, dtype=torch.float32, device=partition.device)
            state["exp_avg_sq"] = torch.zeros(local, dtype=torch.float32, device=partition.device)
            self.state[params[name]] = state

    # ------------------------------------------------------------------ checkpointing (one file per rank)
    def state_dict(self) -> dict[str, Any]:
        """This rank's fragment states and the run state, with torch's state_dict hooks run around them."""
        return self._state_dict_through_hooks(self._fragment_state_dict)

    def _fragment_state_dict(self) -> dict[str, Any]:
        rank, world = _rank_and_world()
        params = self.param_by_name
        blocks = {name: dict(self.state[params[name]]) for name in self.block_names if self.state.get(params[name])}
        group = {key: value for key, value in self.param_groups[0].items() if key not in ("params", "param_names")}
        return {
            "state": {},
            "param_groups": [{**group, "params": []}],
            ZERO_STATE_KEY: {"blocks": blocks, "rank": rank, "world_size": world},
        }

    def _unpack_state_dict(
        self, state_dict: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[torch.nn.Parameter, dict[str, Any]]]:
        zero = state_dict.get(ZERO_STATE_KEY)
        if zero is None:
            raise ValueError("Invalid state_dict: it was not saved by ZeroBlockLLM (no fragment states)")
        rank, world = _rank_and_world()
        if zero["world_size"] != world or zero["rank"] != rank:
            raise ValueError(
                f"Invalid state_dict: saved by rank {zero['rank']} of {zero['world_size']}, loaded by rank {rank} of "
                f"{world}; resume BlockLLM under DeepSpeed ZeRO with the same number of processes"
            )
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

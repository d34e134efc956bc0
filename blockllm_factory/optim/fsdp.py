"""BlockLLM on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): :class:`FsdpBlockLLM`.

Under FSDP2 every parameter is a ``DTensor`` whose local tensor is this rank's dim-0 shard (rank r holds rows
[r * c, (r + 1) * c) of a tensor of n rows, c = ceil(n / world), as ``torch.chunk`` cuts them), and after backward its
``.grad`` is the matching shard of the gradient averaged over ranks (FSDP2's reduce-scatter). No rank holds a whole
weight or gradient outside forward and backward. :class:`FsdpBlockLLM` keeps BlockLLM's decisions (norm table, patience
rule, selection, probes: identical on every rank, see distributed.py) and runs measurement and update on the local
shards:

* Norms: the squared norm of each trainable block's local gradient and the shard's share of the block; the all-reduce
  of the measurement vector sums them into the exact norm of the averaged gradient. FSDP2 owns the gradients, so there
  are no probe hooks: probed blocks are measured from their gradient shards in ``step()``.
* Masks: a newly selected block needs its whole gradient once, for the top-k mask. Every rank writes its shard into a
  zero buffer of the new blocks and one all-reduce (sum) gives every rank the same full gradient (each coordinate is
  one rank's value plus zeros, so it is bit-identical everywhere), and so the same mask, cut as one process cuts it.
  The mask (one bit per coordinate) is kept whole; Adam moments, and the fp32 master of half-precision weights, exist
  only for the selected coordinates of this rank's shard.
* Update: masked AdamW on the local shard, in place; FSDP2 all-gathers the shards at the next forward.
* Blocks are whole tensors (``block_size=0``): a row group may straddle two ranks' shards.
* Checkpoints: ``state_dict()`` holds this rank's shard states and the run state (the same on every rank); it is loaded
  by the same rank of a run with the same number of ranks.

Nothing here imports FSDP: it reads the DTensor's mesh and placements.
"""

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from .blockllm import BlockLLM
from .distributed import assemble_whole, check_saved_rank, rank_and_world
from .functional import masked_adamw_
from .masks import pack_mask, unpack_mask
from .selection import Block, cut_mask
from .settings import invalid_value

FSDP_STATE_KEY = "blockllm_fsdp"
# Settings FSDP2's shards serve with one value only: setting -> (that value, the refusal's "allowed" text).
UNSERVED_SETTINGS = {
    "compact_gradients": (False, "false under FSDP2 (FSDP2 owns the gradient shards)"),
    "block_size": (0, "0 (whole tensors) under FSDP2 (a row group may straddle two ranks' shards)"),
    "optim_bits": (32, "32 under FSDP2 (8-bit moments are not served there)"),
    "master": ("fp32", "fp32 under FSDP2 (compensated weights are not served there)"),
}


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's shard of an FSDP2 parameter (or of its gradient) as a flat tensor, and the offset of its first
    coordinate in the flattened whole tensor."""
    if not isinstance(param, DTensor):
        raise RuntimeError(
            "FsdpBlockLLM.step() found a parameter or gradient that is not a DTensor: wrap the model with FSDP2's "
            "fully_shard before creating the optimizer, or use BlockLLM outside FSDP2."
        )
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise RuntimeError(
            f"FsdpBlockLLM serves FSDP2's dim-0 sharding on a one-dimensional mesh, got placements "
            f"{tuple(param.placements)} on a mesh of shape {tuple(mesh.shape)} (HSDP or tensor parallelism)."
        )
    local = param.to_local()
    rows = param.shape[0] if param.dim() else 1
    chunk = -(-rows // mesh.size())
    first_row = min(rows, mesh.get_local_rank() * chunk)
    if local.shape[0] != max(0, min(chunk, rows - first_row)):
        raise RuntimeError(
            f"FsdpBlockLLM expected rows [{first_row}, {first_row + chunk}) of a tensor of {rows} rows on this rank "
            f"(torch.chunk's cut, as FSDP2 shards), found a local shard of {local.shape[0]} rows."
        )
    return local.view(-1), first_row * (param.numel() // max(rows, 1))


class FsdpBlockLLM(BlockLLM):
    """BlockLLM for a model wrapped with FSDP2's ``fully_shard`` (create it after wrapping, from the sharded
    ``named_parameters()``). Same arguments and decisions as :class:`BlockLLM`; whole-tensor blocks, fp32 moments and
    an fp32 master for half-precision weights (the settings FSDP2's shards cannot serve are refused)."""

    routes_rows = False  # gradients of sharded weights come through the engine, whole

    def __init__(self, params, **kwargs: Any) -> None:
        for setting, (served, allowed) in UNSERVED_SETTINGS.items():
            value = kwargs.setdefault(setting, served)
            if value != served:
                raise invalid_value(setting, allowed, value)
        super().__init__(params, **kwargs)
        self.set_probe_hooks(False)  # FSDP2 reduce-scatters the gradients; norms come from the shards in step()
        # Parameter name -> index of its group (torch's load_state_dict replaces the group dicts, not their order).
        self._group_of = {
            name: index for index, group in enumerate(self.param_groups) for name in group["param_names"]
        }
        self.register_state_dict_post_hook(_add_rank)

    # ------------------------------------------------------------------ measurement and update on local shards
    def _measure(self) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, list[str]]:
        params, sizes = self.param_by_name, self.block_sizes
        selected = list(self.kept_coordinates)
        squared_norms: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        for name in dict.fromkeys([*selected, *self.probed_blocks]):
            grad = params[name].grad
            if grad is None:
                continue
            shard, _ = local_shard(grad)
            squared_norms[name] = torch.linalg.vector_norm(shard, dtype=torch.float32).square()
            shares[name] = shard.numel() / sizes[name]
        # Every rank updates the same selection (its shard may be empty); a missing gradient means no backward.
        return squared_norms, shares, [name for name in selected if params[name].grad is not None]

    def _apply_updates(self, selected_names: list[str]) -> None:
        params, sizes = self.param_by_name, self.block_sizes
        self._init_states([name for name in selected_names if not self.state.get(params[name])])
        for name in selected_names:
            param = params[name]
            group = self.param_groups[self._group_of[name]]
            beta1, beta2 = group["betas"]
            state = self.state[param]
            state["step"] += 1
            weights, offset = local_shard(param.data)
            if not weights.numel():
                continue
            grad, _ = local_shard(param.grad)
            mask = None
            if "mask" in state:
                mask = unpack_mask(state["mask"], sizes[name]).narrow(0, offset, weights.numel())
            masked_adamw_(
                weights,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                mask,
                state.get("master"),
                step=state["step"],
                lr=self.update_lr(group, state["step"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def _init_states(self, names: list[str]) -> None:
        """Masks from the whole averaged gradient of newly selected blocks (one all-reduce), then moments (and
        masters of half-precision weights) for the selected coordinates of this rank's shard."""
        params, sizes, kept = self.param_by_name, self.block_sizes, self.kept_coordinates
        masked = [name for name in names if kept[name] < sizes[name]]
        full_grads: dict[str, torch.Tensor] = {}
        if masked:
            shards = [local_shard(params[name].grad) for name in masked]
            pieces = [(index, offset, shard) for index, (shard, offset) in enumerate(shards)]
            whole = assemble_whole([sizes[name] for name in masked], pieces, shards[0][0].device)
            full_grads = dict(zip(masked, whole))
        for name in names:
            param = params[name]
            weights, offset = local_shard(param.data)
            state: dict[str, Any] = {"step": 0}
            selected = weights
            if name in full_grads:
                # The mask one process cuts, on the same averaged gradient.
                mask = cut_mask(full_grads[name], [(Block(name, name, 0, sizes[name]), kept[name])])  # whole tensors
                state["mask"] = pack_mask(mask)
                selected = weights[mask.narrow(0, offset, weights.numel())]
            state["exp_avg"] = torch.zeros(selected.numel(), dtype=torch.float32, device=weights.device)
            state["exp_avg_sq"] = torch.zeros(selected.numel(), dtype=torch.float32, device=weights.device)
            if weights.dtype != torch.float32:
                state["master"] = selected.float()  # only this shard's selected coordinates
            self.state[param] = state

    # ------------------------------------------------------------------ checkpointing (one file per rank)
    def _unpack_state_dict(
        self, state_dict: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[torch.nn.Parameter, dict[str, Any]]]:
        saved = state_dict.get(FSDP_STATE_KEY)
        if saved is None:
            raise ValueError("Invalid state_dict: it was not saved by FsdpBlockLLM (no shard states)")
        check_saved_rank(saved["rank"], saved["world_size"], "FSDP2")
        return super()._unpack_state_dict(state_dict)


def _add_rank(optimizer: FsdpBlockLLM, state_dict: dict[str, Any]) -> None:
    """The rank and world size whose shards the state holds, checked when it is loaded."""
    rank, world = rank_and_world()
    state_dict[FSDP_STATE_KEY] = {"rank": rank, "world_size": world}

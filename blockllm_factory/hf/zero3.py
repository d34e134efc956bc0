"""DeepSpeed ZeRO-3 partitions of BlockLLM's selection only: the rebuild ``ZeroBlockLLM`` asks for when its selection
changes (:class:`blockllm_factory.optim.zero.PartitionRebuilder`).

DeepSpeed's Stage-3 optimizer keeps, for every parameter of its groups, this rank's fp32 master partition and gradient
partition, and hooks that reduce-scatter the parameter's gradient into that partition. Built over every eligible
tensor (BlockLLM's first step probes them all), that is 4 + 4 bytes per eligible parameter divided by the processes,
whatever BlockLLM selected. Here the groups are rebuilt to the tensors with selected blocks, as BAdam rebuilds them at
each block switch (badam 1.4, ``_switch_trainable_params_zero3``), with DeepSpeed's own methods:
``_create_fp16_partitions_with_defragmentation`` (the flat buffer of the group's weight shards),
``_setup_for_real_optimizer`` (the fp32 partition, the gradient partition, the reduce buckets),
``set_grad_positions`` (where each parameter's slice lies, which ``ZeroBlockLLM`` reads),
``create_reduce_and_remove_grad_hooks`` (the gradient hooks of the group), and the parameter coordinator's trace
invalidated. What differs from BAdam's:

* the last update of the tensors that leave the partitions is copied from the fp32 partition into their weight shards
  first (DeepSpeed copies it after the client's ``step()`` returns, and the rebuild runs inside that step), and each
  leaving shard gets its own storage, so that the old flat buffer is freed;
* the fp32 values of the tensors that stay selected are copied into the new fp32 partition (with bf16 weights they
  would otherwise restart from the rounded weights);
* DeepSpeed's per-parameter bookkeeping (``param_dict``, ``params_already_reduced``, ``grad_position``, the sub-group
  maps) is rebuilt for the new group.

The Stage-3 optimizer's methods and attributes used here are listed in ``patches/_surfaces.py``
(``DEEPSPEED_SURFACES``), checked at parse time for DeepSpeed runs; besides them it uses the attributes ZeRO-3 gives
every parameter (``_z3_optimizer``, ``ds_tensor``, ``partition_numel()``, ``ds_persist``, ``all_gather()``), as
``optim/zero.py`` reads ``ds_numel``. The rebuild runs on every rank alike (the selection is the same everywhere);
it gathers each new parameter once (DeepSpeed's hook registration does) and synchronises the ranks twice (DeepSpeed's
barriers).
"""

from collections.abc import Mapping

import torch


def _stage3(params):
    """DeepSpeed's Stage-3 optimizer that manages ``params`` (None before ``deepspeed.initialize``)."""
    for param in params:
        optimizer = getattr(param, "_z3_optimizer", None)
        if optimizer is not None:
            return optimizer
    return None


def _offsets(stage3) -> dict[int, tuple[int, int]]:
    """id(param) -> (offset, numel) of its slice in the (single) fp32 partition."""
    slices = {}
    for group in stage3.fp16_groups:
        offset = 0
        for param in group:
            slices[id(param)] = (offset, int(param.partition_numel()))
            offset += int(param.partition_numel())
    return slices


class Zero3Partitions:
    """The :class:`~blockllm_factory.optim.zero.PartitionRebuilder` of DeepSpeed ZeRO-3 (one parameter group, one
    sub-group: ``sub_group_size`` is checked at parse time)."""

    checkpoints_all_weights = False  # DeepSpeed's ZeRO-3 checkpoint restores the weights of its partitions only

    def rebuild(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        wanted = list(params.values())
        stage3 = _stage3(wanted)
        if stage3 is None:
            raise RuntimeError("BlockLLM: the ZeRO-3 partitions were asked to change before DeepSpeed managed them")
        if len(stage3.fp16_groups) != 1:
            raise RuntimeError(
                "BlockLLM rebuilds DeepSpeed ZeRO-3's partitions of one parameter group in one sub-group; found "
                f"{len(stage3.fp16_groups)} sub-groups (raise `zero_optimization.sub_group_size`)"
            )
        old_params = list(stage3.fp16_groups[0])
        old_slices = _offsets(stage3)
        old_fp32 = stage3.fp32_partitioned_groups_flat[0]
        # The fp32 partition's last update into the weight shards (DeepSpeed would do it after this step()).
        stage3._reassign_or_swap_out_partitioned_parameters(0)
        staying = {id(param) for param in wanted}
        kept_fp32 = {
            id(param): old_fp32.detach().narrow(0, *old_slices[id(param)]).clone()
            for param in old_params
            if id(param) in staying and old_fp32.dtype != param.ds_tensor.dtype
        }
        for param in old_params:  # own storage: the old flat buffer of shards can go
            param.ds_tensor.data = param.ds_tensor.data.clone()
        for handle in (*stage3._grad_acc_hooks, *stage3._leaf_module_hooks):
            handle.remove()
        stage3._grad_acc_hooks = []
        stage3._leaf_module_hooks = []
        del old_fp32
        # DeepSpeed's bookkeeping of its groups, emptied as its constructor starts it.
        stage3.fp16_groups = []
        stage3.fp16_partitioned_groups = []
        stage3.fp16_partitioned_groups_flat = []
        stage3.fp16_partitioned_groups_flat_numel = []
        stage3.fp16_partitioned_groups_flat_id = []
        stage3.groups_padding = []
        stage3.fp32_partitioned_groups_flat = []
        stage3.sub_group_to_group_id = {}
        stage3.sub_group_process_groups = []
        stage3.sub_group_partition_counts = []
        stage3.averaged_gradients = {}
        stage3.lp_param_buffer = None
        stage3.grad_partitions_flat_buffer = None
        for param in wanted:
            param.requires_grad_(True)
        stage3.trainable_param_groups = [{**stage3.trainable_param_groups[0], "params": wanted}]
        stage3._create_fp16_partitions_with_defragmentation(stage3.trainable_param_groups)
        stage3.param_dict = {}
        stage3.params_already_reduced = {}
        for param in wanted:
            param_id = stage3.get_param_id(param)
            stage3.param_dict[param_id] = param
            stage3.params_already_reduced[param_id] = False
        stage3._setup_for_real_optimizer()
        stage3.grad_position = {}
        stage3.set_grad_positions()
        stage3.create_reduce_and_remove_grad_hooks()
        if kept_fp32:
            new_slices = _offsets(stage3)
            new_fp32 = stage3.fp32_partitioned_groups_flat[0]
            for param in wanted:
                if id(param) in kept_fp32:
                    new_fp32.data.narrow(0, *new_slices[id(param)]).copy_(kept_fp32[id(param)])
        coordinator = stage3._get_param_coordinator()
        if not coordinator.is_invalid_trace():  # the module order it traced holds other parameters' hooks
            coordinator._invalidate_trace()

    def shard(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor.data.view(-1)

    def shards_written(self, params: list[torch.nn.Parameter]) -> None:
        # Persistent parameters (below `stage3_param_persistence_threshold`) stay whole on every rank: gathered anew
        # from the written shards, as DeepSpeed does after each step.
        stage3 = _stage3(params)
        persistent = [param for param in params if getattr(param, "ds_persist", False)]
        if stage3 is not None and persistent:
            persistent[0].all_gather(persistent)

"""DeepSpeed ZeRO-1/2 partitions of BlockLLM's selection only: the rebuild ``ZeroBlockLLM`` asks for when its selection
changes (:class:`blockllm_factory.optim.zero.PartitionRebuilder`).

DeepSpeed's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``; ZeRO-1 with bf16 weights and fp32 gradient accumulation,
``data_types.grad_accum_dtype: fp32``, is ``BF16_Optimizer``) flattens the parameters of its groups into one bit16
buffer (each parameter's ``.data`` a view into it), keeps this rank's slice of it as an fp32 master partition with a
gradient partition, links each parameter to its fragment of the fp32 partition (``_hp_mapping``, which ``ZeroBlockLLM``
reads) and hooks each parameter's gradient. Built over every eligible tensor (BlockLLM's first step probes them all),
that is 4 + 4 bytes per eligible parameter divided by the processes, whatever BlockLLM selected. All of it is built
inline in the optimizer's constructor (there is no method that rebuilds one group, as ZeRO-3 has), so the rebuild runs
DeepSpeed's own constructor path again, through the engine (``_configure_zero_optimizer``, or
``_configure_bf16_optimizer`` for ``BF16_Optimizer``), with the client optimizer's group holding the selected tensors,
and the new optimizer's state becomes the old object's: the engine, accelerate's wrapper and the Trainer keep holding
the same object, so nothing has to be re-pointed. Around that:

* the fp32 partition's last update is copied into the weights and all-gathered first (``update_lp_params``:
  DeepSpeed would do it after the client's ``step()`` returns, and the rebuild runs inside that step);
* the old groups are left: gradient hooks removed, every weight given its own storage (the old flat buffer is freed),
  the fragment links cleared, and the client's state entry DeepSpeed keyed by the old fp32 partition dropped;
* the fp32 values of the tensors that stay selected are carried into the new partition when the weights are not fp32
  (they would otherwise restart from the rounded weights): a tensor's coordinates may lie on another rank after the
  rebuild, so each rank writes its fragments into a zero buffer of those tensors and one all-reduce gives every rank
  all of them;
* what DeepSpeed's optimizer changes while training (the loss scaler, the last gradient norm) and methods set on the
  instance by others (accelerate, this module's load) are kept.

Resume: DeepSpeed's ZeRO-1/2 load compares the checkpoint's layout (one padding per parameter of its groups) with the
current one before it hands the client its state, so the load is wrapped (:meth:`Zero12Partitions.attach`): the
client's state is loaded first, which rebuilds the partitions to the saved selection, then DeepSpeed's own load runs
(and loads the client's state again, a no-op for the partitions). Every rank holds whole weights under ZeRO-1/2 and
DeepSpeed's checkpoint saves them all, so unlike ZeRO-3 no weight shards are saved besides.

The engine is needed to re-run its constructor path: :meth:`Zero12Partitions.attach` is called with it after
accelerate creates it (``hf/wiring.py``). The DeepSpeed methods and attributes used here are listed in
``patches/_surfaces.py`` (``DEEPSPEED_SURFACES``), checked at parse time for DeepSpeed runs.
"""

from collections.abc import Mapping

import torch

from blockllm_factory.optim.distributed import assemble_whole

# Changed by DeepSpeed's optimizer while training (not by its constructor): kept across a rebuild.
_RUNTIME_STATE = (
    "loss_scaler",
    "dynamic_loss_scale",
    "_global_grad_norm",
    "custom_loss_scaler",
    "external_loss_scale",
)
_BASE_OPTIMIZER_STATE = "base_optimizer_state"  # deepspeed.checkpoint.constants.BASE_OPTIMIZER_STATE


def _bit16_groups(zero_optimizer) -> list[list[torch.nn.Parameter]]:
    groups = getattr(zero_optimizer, "bit16_groups", None)  # DeepSpeedZeroOptimizer
    return groups if groups is not None else zero_optimizer.bf16_groups  # BF16_Optimizer


class Zero12Partitions:
    """The :class:`~blockllm_factory.optim.zero.PartitionRebuilder` of DeepSpeed ZeRO-1/2 (one parameter group: the
    client shows DeepSpeed one)."""

    checkpoints_all_weights = True  # every rank holds whole weights; DeepSpeed's checkpoint saves them

    def __init__(self) -> None:
        self._engine = None
        self._loading = False

    def attach(self, deepspeed_engine) -> None:
        """Hands over the DeepSpeed engine whose optimizer is rebuilt (after ``deepspeed.initialize``), and wraps that
        optimizer's checkpoint load so that the partitions are rebuilt to the saved selection before DeepSpeed checks
        the checkpoint's layout."""
        if deepspeed_engine is self._engine:
            return
        self._engine = deepspeed_engine
        self._wrap_load(deepspeed_engine.optimizer)

    def _wrap_load(self, zero_optimizer) -> None:
        load = type(zero_optimizer).load_state_dict.__get__(zero_optimizer)

        def load_rebuilt_first(state_dict_list, *args, **kwargs):
            if state_dict_list:
                import torch.distributed as dist

                rank = dist.get_rank(group=zero_optimizer.dp_process_group)
                self._loading = True  # the weights are the checkpoint's: nothing to copy from the old fp32 partition
                try:
                    zero_optimizer.optimizer.load_state_dict(state_dict_list[rank][_BASE_OPTIMIZER_STATE])
                finally:
                    self._loading = False
            return load(state_dict_list, *args, **kwargs)

        zero_optimizer.load_state_dict = load_rebuilt_first

    def rebuild(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        if self._engine is None:
            raise RuntimeError(
                "BlockLLM: DeepSpeed ZeRO-1/2's partitions were asked to change before its engine was handed over "
                "(Zero12Partitions.attach, called when accelerate prepares the model)"
            )
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        deepspeed_engine = self._engine
        old = deepspeed_engine.optimizer
        client = old.optimizer
        wanted = list(params.values())
        old_params = [param for group in _bit16_groups(old) for param in group]
        if not self._loading:  # inside DeepSpeed's step: this step's update into the weights, on every rank
            old.update_lp_params()
        kept = self._gather_staying_fp32(old, old_params, wanted) if not self._loading else {}
        for handle in old._grad_acc_hooks:
            handle.remove()
        old._grad_acc_hooks = []
        for param in old_params:  # own storage: the old flat buffer can go
            param.data = param.data.clone()
            param._hp_mapping = None
        for partition in client.param_groups[0]["params"]:  # DeepSpeed's state link to its old fp32 partition
            client.state.pop(partition, None)
        kept_state = {name: old.__dict__[name] for name in _RUNTIME_STATE if name in old.__dict__}
        overrides = {
            name: value
            for name, value in old.__dict__.items()
            if callable(value) and hasattr(type(old), name) and not name.startswith("__")
        }
        for param in wanted:
            param.requires_grad_(True)
        client.param_groups[0]["params"] = wanted
        if isinstance(old, BF16_Optimizer):
            fresh = deepspeed_engine._configure_bf16_optimizer(client)
        else:
            fresh = deepspeed_engine._configure_zero_optimizer(client)
        fresh.__dict__.update(kept_state)
        fresh.__dict__.update(overrides)
        # One state for both objects: the engine, accelerate's wrapper and the Trainer hold `old`; the gradient hooks
        # DeepSpeed just registered call `fresh`.
        old.__dict__ = fresh.__dict__
        for param in wanted:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None and id(param) in kept:
                start, numel = int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)
                mapping.hp_fragment.data.copy_(kept[id(param)].narrow(0, start, numel))

    @staticmethod
    def _gather_staying_fp32(old, old_params, wanted) -> dict[int, torch.Tensor]:
        """The fp32 values of the half-precision tensors that stay in the partitions, whole and flat on every rank, by
        ``id`` of the parameter (none with fp32 weights: the weights are the values)."""
        staying = {id(param) for param in wanted}
        params = [param for param in old_params if id(param) in staying and param.dtype != torch.float32]
        if not params:
            return {}
        pieces = [
            (index, int(param._hp_mapping.lp_fragment_address.start), param._hp_mapping.hp_fragment.data)
            for index, param in enumerate(params)
            if param._hp_mapping is not None
        ]
        whole = assemble_whole([param.numel() for param in params], pieces, params[0].device, old.dp_process_group)
        return {id(param): values for param, values in zip(params, whole)}

    def shard(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.data.view(-1)  # every rank holds the whole weight

    def shards_written(self, params: list[torch.nn.Parameter]) -> None:
        """Nothing is derived from the weights under ZeRO-1/2 (the rebuild makes the fp32 partition from them)."""

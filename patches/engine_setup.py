"""Multi-process training of ``finetuning_type: blockllm``: what is checked and adjusted at parse time.

Called from :func:`.parser.check_training_setup` (the wrapper of ``_check_extra_dependencies``, which sees the model,
fine-tuning and training arguments before anything is loaded). It does not touch torch.distributed.

Plain DDP (``FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train``):

* BlockLLM switches ``requires_grad`` during the run. DDP builds its reducer over the parameters that require grad
  when the model is wrapped (HF Trainer creates the optimizer first, and BlockLLM's first step probes every eligible
  block, so all of them are in the reducer); at each step only the selected and probed ones produce gradients. DDP
  must therefore look for unused parameters every step: ``ddp_find_unused_parameters`` is set to true (an explicit
  ``false`` is refused), and a static graph is refused.
* Reentrant gradient checkpointing runs the checkpointed forward again inside backward, where DDP's search for unused
  parameters cannot see it; it is switched to the non-reentrant kind (``use_reentrant_gc: false``) with a log line.
* Resuming on CPU needs torch to accept the storage location ``cpu:0`` (:mod:`.serialization`).

DeepSpeed: the config is checked and adjusted in :mod:`.deepspeed_config`; how BlockLLM runs inside ZeRO-1/2/3:
:mod:`blockllm_factory.optim.zero`.
"""

from blockllm_factory.optim.settings import BLOCK_SIZE_HEAD

from . import deepspeed_config
from .serialization import allow_loading_on_indexed_cpu


def check_distributed_setup(model_args, finetuning_args, training_args) -> None:
    """Refuses what BlockLLM cannot serve across processes and sets what it needs; errors name the argument."""
    if getattr(training_args, "fsdp", None):
        raise ValueError(
            "`fsdp` cannot be combined with `finetuning_type: blockllm` (supported engines: DDP and DeepSpeed "
            "ZeRO-1/2/3); remove `fsdp`."
        )
    if training_args.deepspeed:
        # The default, `head`, falls back to whole tensors there (see patches/optimizer.py); a number is refused.
        if getattr(finetuning_args, "blockllm_block_size", 0) not in (0, BLOCK_SIZE_HEAD):
            raise ValueError(
                f"`blockllm_block_size: {finetuning_args.blockllm_block_size}` cannot be combined with `deepspeed` "
                "(the ZeRO adapter selects whole tensors); set `blockllm_block_size: 0`, or train without `deepspeed`."
            )
        if getattr(finetuning_args, "blockllm_master", "fp32") != "fp32":
            raise ValueError(
                f"`blockllm_master: {finetuning_args.blockllm_master}` cannot be combined with `deepspeed` "
                "(DeepSpeed's fp32 partition is the master copy there); set `blockllm_master: fp32`, or train without "
                "`deepspeed`."
            )
        deepspeed_config.check_deepspeed_config(deepspeed_config.read_deepspeed_config(training_args))
        deepspeed_config.leave_clipping_to_blockllm(training_args)
        deepspeed_config.connect_deepspeed_comm()
        return
    if training_args.world_size <= 1:
        return
    allow_loading_on_indexed_cpu()
    if training_args.ddp_find_unused_parameters is False:
        raise ValueError(
            "`ddp_find_unused_parameters: false` cannot be combined with `finetuning_type: blockllm` under DDP: the "
            "parameters that produce gradients change with BlockLLM's selection; remove it (it is set to true)."
        )
    if training_args.ddp_static_graph:
        raise ValueError(
            "`ddp_static_graph: true` cannot be combined with `finetuning_type: blockllm`: the set of parameters "
            "that produce gradients changes with BlockLLM's selection; remove it."
        )
    training_args.ddp_find_unused_parameters = True
    if not model_args.disable_gradient_checkpointing and model_args.use_reentrant_gc:
        from llamafactory.extras import logging

        model_args.use_reentrant_gc = False
        logging.get_logger(__name__).info_rank0(
            "BlockLLM under DDP: `use_reentrant_gc` set to false (reentrant checkpointing hides parameters from "
            "DDP's search for unused ones)."
        )

"""Which weight precision a ``finetuning_type: blockllm`` model keeps under LLaMA-Factory's mixed precision.

The optimizer-state precision (``optim``: fp32 or 8-bit moments) is read by the engine choice both fronts share,
:mod:`blockllm_factory.hf.engine` (``check_optim``, ``optim_bits``, ``compact_gradients``).
"""


def keeps_half_precision_weights(model_args) -> bool:
    """Whether a ``blockllm`` model keeps its bf16/fp16 weights under mixed precision (instead of LLaMA-Factory's
    upcast of every trainable weight to fp32): BlockLLM holds fp32 masters for the selected coordinates itself.

    Exceptions, where today's rule stays: DeepSpeed (its engine decides the weights' dtype and holds fp32 master
    partitions), and fp16 with several processes (DDP keeps dense gradients, in the weights' dtype, and the fp16
    GradScaler refuses to unscale fp16 gradients; in one process they are compacted into an fp32 buffer).
    """
    import os

    import torch
    from transformers.integrations.deepspeed import deepspeed_config

    if deepspeed_config() is not None:
        return False
    dtype = getattr(model_args, "compute_dtype", None)
    if dtype == torch.bfloat16:
        return True
    return dtype == torch.float16 and int(os.environ.get("WORLD_SIZE", "1")) <= 1

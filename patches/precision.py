"""Which weight precision a ``finetuning_type: blockllm`` model keeps under LLaMA-Factory's mixed precision.

The optimizer-state precision (``optim``: fp32 or 8-bit moments) is read by the engine choice both fronts share,
:mod:`blockllm_factory.hf.engine` (``check_optim``, ``optim_bits``, ``Engine``).
"""


def keeps_half_precision_weights(model_args) -> bool:
    """Whether a ``blockllm`` model keeps its bf16/fp16 weights under mixed precision (instead of LLaMA-Factory's
    upcast of every trainable weight to fp32): BlockLLM holds fp32 masters for the selected coordinates itself.

    The run's engine decides (``Engine.keeps_half_precision_weights``, decided when the training arguments were
    checked, :func:`.engine_setup.run_engine`): not under DeepSpeed (its engine decides the weights' dtype and holds
    fp32 master partitions), nor fp16 under DDP (dense gradients in the weights' dtype, which the fp16 GradScaler
    refuses to unscale; in one process they are compacted into an fp32 buffer).
    """
    from .engine_setup import run_engine

    return run_engine().keeps_half_precision_weights(getattr(model_args, "compute_dtype", None))

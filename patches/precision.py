"""Which optimizer-state precision ``finetuning_type: blockllm`` runs with, read from LLaMA-Factory's ``optim``.

Like LLaMA-Factory's GaLore integration, BlockLLM honours the ``optim`` training argument instead of adding a flag of
its own: the AdamW names give fp32 moments, the bitsandbytes 8-bit names give block-wise 8-bit moments for the
selected coordinates (see ``blockllm_factory/optim/quantization.py``). Any other value is refused at parse time.
"""

FP32_OPTIMS = ("adamw_torch", "adamw_torch_fused")
EIGHT_BIT_OPTIMS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")


def optim_name(training_args) -> str:
    optim = training_args.optim
    return str(getattr(optim, "value", optim))


def check_optim(training_args) -> None:
    """Errors name ``optim`` and the values BlockLLM accepts."""
    name = optim_name(training_args)
    if name not in FP32_OPTIMS + EIGHT_BIT_OPTIMS:
        raise ValueError(
            f"`optim: {name}` cannot be combined with `finetuning_type: blockllm` (BlockLLM is itself the optimizer); "
            f"use one of {', '.join(FP32_OPTIMS)} (fp32 Adam moments) or {', '.join(EIGHT_BIT_OPTIMS)} (8-bit "
            "moments through bitsandbytes)."
        )
    if name in EIGHT_BIT_OPTIMS and getattr(training_args, "deepspeed", None):
        raise ValueError(
            f"`optim: {name}` cannot be combined with `finetuning_type: blockllm` under DeepSpeed ZeRO (its optimizer "
            "states live in DeepSpeed's fp32 partitions); use adamw_torch, or train without `deepspeed`."
        )
    if name in EIGHT_BIT_OPTIMS:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"`optim: {name}` needs bitsandbytes for BlockLLM's 8-bit moments: pip install bitsandbytes"
            ) from error


def optim_bits(training_args) -> int:
    """32 or 8: the precision of BlockLLM's Adam moments for this ``optim``."""
    return 8 if optim_name(training_args) in EIGHT_BIT_OPTIMS else 32


def compact_gradients(training_args) -> bool:
    """Whether BlockLLM compacts gradients: not where an engine owns the gradient buffers (DDP, DeepSpeed)."""
    return not getattr(training_args, "deepspeed", None) and int(getattr(training_args, "world_size", 1)) <= 1


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

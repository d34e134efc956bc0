"""Surface ``llamafactory.model.adapter``: a ``blockllm`` model is set up exactly like full tuning.

BlockLLM trains the plain model (no adapter modules); the optimizer decides at each step which parameters require
grad. So ``init_adapter`` runs LLaMA-Factory's full-tuning path: forbidden modules (e.g. a frozen vision tower) stay
frozen. Under mixed precision (``bf16``/``fp16``) the weights stay in half precision, as LLaMA-Factory does for BAdam:
BlockLLM keeps fp32 master copies of the selected coordinates only (exceptions in ``precision.py``: DeepSpeed, and fp16
with several processes, keep LLaMA-Factory's upcast to fp32). Saving, export and chat then treat the result as a full
model.
"""

import functools

from blockllm_factory.optim.settings import DEFAULTS, FINETUNING_TYPE

from ._version import check_llamafactory_version


def describe_precision(model, master: str = DEFAULTS["master"]) -> str:
    """What the trainable weights are, read from the model as LLaMA-Factory set it up (not from the settings: a model
    stored in fp32, or fp16 on a CPU, stays fp32), and what keeps their high-precision part (``blockllm_master``)."""
    import torch

    dtypes = sorted({str(param.dtype) for param in model.parameters() if param.requires_grad})
    if dtypes and all(dtype in (str(torch.bfloat16), str(torch.float16)) for dtype in dtypes):
        kept = (
            "fp32 masters exist"
            if master == "fp32"
            else "compensation buffers in the weights' dtype (`blockllm_master: compensated`) exist instead of fp32 "
            "masters"
        )
        half = ", ".join(dtypes)
        return f"BlockLLM: trainable weights stay in half precision ({half}); {kept} for the selected coordinates."
    return f"BlockLLM: trainable weights are {', '.join(dtypes) or 'none'}; no fp32 master copies are needed."


def build_init_adapter(original, logger):
    @functools.wraps(original)
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        if finetuning_args.finetuning_type != FINETUNING_TYPE:
            return original(config, model, model_args, finetuning_args, is_trainable)

        if is_trainable:
            logger.info_rank0(
                "Fine-tuning method: BlockLLM (full model; the optimizer picks the trainable blocks at each step)."
            )
        # LLaMA-Factory's full-tuning branch; the arguments are restored even if it raises. Its precision rule
        # upcasts every trainable weight to fp32 except for pure_bf16 and BAdam; BlockLLM keeps half-precision
        # weights in the same cases as BAdam does (see precision.keeps_half_precision_weights).
        from .precision import keeps_half_precision_weights

        keep_half = is_trainable and keeps_half_precision_weights(model_args) and not finetuning_args.pure_bf16
        use_badam = finetuning_args.use_badam
        finetuning_args.finetuning_type = "full"
        finetuning_args.use_badam = use_badam or keep_half  # the flag LLaMA-Factory's precision rule reads
        if is_trainable:  # frozen layers on the gradient path are checkpointed (layer_checkpointing.py)
            from .layer_checkpointing import mark

            mark(model)
        try:
            model = original(config, model, model_args, finetuning_args, is_trainable)
        finally:
            finetuning_args.finetuning_type = FINETUNING_TYPE
            finetuning_args.use_badam = use_badam
        if is_trainable:
            from .model_checks import check_embedding_modules

            check_embedding_modules(model, model_args, finetuning_args, logger)
            master = getattr(finetuning_args, "blockllm_master", DEFAULTS["master"])
            logger.info_rank0(describe_precision(model, master))
        return model

    return init_adapter


def apply(module) -> None:
    check_llamafactory_version()
    module.init_adapter = build_init_adapter(module.init_adapter, module.logger)

"""Surface ``llamafactory.model.adapter``: a ``blockllm`` model is set up exactly like full tuning.

BlockLLM trains the plain model (no adapter modules); the optimizer decides at each step which parameters require
grad. So ``init_adapter`` runs LLaMA-Factory's full-tuning path: forbidden modules (e.g. a frozen vision tower) stay
frozen, and trainable weights are upcast to float32 unless ``pure_bf16`` is set (or ZeRO-3 keeps them in fp32 itself),
the same rule as ``finetuning_type: full``. Saving, export and chat then treat the result as a full model.
"""

from ._version import check_llamafactory_version

FINETUNING_TYPE = "blockllm"


def build_init_adapter(original, logger):
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        if finetuning_args.finetuning_type != FINETUNING_TYPE:
            return original(config, model, model_args, finetuning_args, is_trainable)

        if is_trainable:
            logger.info_rank0(
                "Fine-tuning method: BlockLLM (full model; the optimizer picks the trainable blocks at each step)."
            )
        # LLaMA-Factory's full-tuning branch, with its precision rule; the type is restored even if it raises.
        finetuning_args.finetuning_type = "full"
        try:
            return original(config, model, model_args, finetuning_args, is_trainable)
        finally:
            finetuning_args.finetuning_type = FINETUNING_TYPE

    init_adapter.__wrapped__ = original
    init_adapter.__doc__ = original.__doc__
    return init_adapter


def apply(module) -> None:
    check_llamafactory_version()
    module.init_adapter = build_init_adapter(module.init_adapter, module.logger)

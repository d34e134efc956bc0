"""BlockLLM for transformers ``Trainer`` and TRL users, without LLaMA-Factory (docs/hf.md).

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMTrainer   # or BlockLLMSFTTrainer (TRL)

    trainer = BlockLLMTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                              blockllm_config=BlockLLMConfig(blockllm_sparsity=0.95))
    trainer.train()

The room beside ``patches/``: it may import transformers, TRL and the optimizer, never LLaMA-Factory or the patches;
the patches build on its shared pieces (:mod:`.optimizer`, :mod:`.wiring`, :mod:`.engine`, :mod:`.telemetry`).
"""

__all__ = ["BlockLLMConfig", "BlockLLMSFTTrainer", "BlockLLMTrainer", "BlockLLMTrainerMixin", "make_blockllm_trainer"]
_IN_MODULE = {
    "BlockLLMConfig": "config",
    "BlockLLMTrainer": "trainer",
    "BlockLLMTrainerMixin": "trainer",
    "make_blockllm_trainer": "trainer",
}


def __getattr__(name: str):
    # Imported on first use: the patches import this package's shared modules without needing the Trainer classes,
    # and TRL (an optional dependency of this front) is imported only when its trainer is asked for.
    import importlib

    if name in _IN_MODULE:
        value = getattr(importlib.import_module(f"{__name__}.{_IN_MODULE[name]}"), name)
    elif name == "BlockLLMSFTTrainer":
        from trl import SFTTrainer

        value = importlib.import_module(f"{__name__}.trainer").make_blockllm_trainer(SFTTrainer)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value

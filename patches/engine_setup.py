"""Multi-process training of ``finetuning_type: blockllm``: what is checked and adjusted at parse time.

Called from :func:`.parser.check_training_setup` (the wrapper of ``_check_extra_dependencies``, which sees the model,
fine-tuning and training arguments before anything is loaded). It does not touch torch.distributed.

Plain DDP (``FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train``):

* BlockLLM's weights are left out of DDP, and BlockLLM averages its selected and probed blocks across ranks itself
  (``blockllm_factory/hf/wiring.py``; in LLaMA-Factory's runs every trainable parameter is BlockLLM's, so the model is
  not wrapped in DDP at all). For a DDP over trainable parameters BlockLLM does not own, whose use may change with the
  selection, ``ddp_find_unused_parameters`` is still set to true (an explicit ``false`` is refused), a static graph is
  refused, and reentrant gradient checkpointing (whose forward inside backward DDP's search for unused parameters
  cannot see) is switched to the non-reentrant kind (``use_reentrant_gc: false``) with a log line.
* DeepSpeed ZeRO-3: reentrant gradient checkpointing is switched to the non-reentrant kind too. In the backward pass a
  reentrant checkpoint recomputes its layer before the layer's own backward has begun, so DeepSpeed (0.19) attributes
  the frozen weights it gathers for that recomputation to the enclosing model and releases them only when the whole
  backward pass ends: BlockLLM freezes most tensors of every layer, so every layer's gathered frozen weights were
  held at once. Non-reentrant checkpointing recomputes inside the layer's backward, which releases them layer by layer
  (docs/distributed.md, "ZeRO-3 and gradient checkpointing").
* Resuming on CPU needs torch to accept the storage location ``cpu:0`` (``blockllm_factory/hf/serialization.py``,
  registered by ``check_ddp``, shared with the Trainer front).

DeepSpeed: the config is checked and adjusted in ``blockllm_factory/hf/deepspeed_config.py`` (shared with the Trainer
front); how BlockLLM runs inside ZeRO-1/2/3:
:mod:`blockllm_factory.optim.zero`.

The engine itself is decided once, by :func:`blockllm_factory.hf.engine.engine_of` from the training arguments; this
check keeps that decision as the run's (:func:`run_engine`) for the parts of LLaMA-Factory's front that are not handed
the training arguments (the weights' precision when the model is loaded, ``precision.py``).
"""

# The engine of the run whose arguments this process parsed last (LLaMA-Factory parses once per training process).
_RUN_ENGINE = None


def run_engine():
    """The :class:`blockllm_factory.hf.engine.Engine` decided when this process's training arguments were checked;
    one process when none were (a model loaded outside a training run is not trained by an engine)."""
    from blockllm_factory.hf.engine import SINGLE, Engine

    return _RUN_ENGINE if _RUN_ENGINE is not None else Engine(SINGLE)


def check_distributed_setup(model_args, finetuning_args, training_args) -> None:
    """Refuses what BlockLLM cannot serve across processes and sets what it needs; errors name the argument."""
    global _RUN_ENGINE
    from blockllm_factory.hf.engine import check_ddp, engine_of

    # FSDP refused; DDP: its search for unused parameters, resume on CPU (shared with the Trainer front).
    check_ddp(training_args)
    decided = _RUN_ENGINE = engine_of(training_args)
    if decided.deepspeed:
        from blockllm_factory.hf.deepspeed_config import prepare_deepspeed

        prepare_deepspeed(training_args, finetuning_args)
    use_non_reentrant_checkpointing(model_args, decided)


def use_non_reentrant_checkpointing(model_args, decided) -> None:
    """Switches reentrant gradient checkpointing to the non-reentrant kind, with a log line, where the engine needs
    it (:attr:`blockllm_factory.hf.engine.Engine.non_reentrant_checkpointing`: DDP and DeepSpeed ZeRO-3)."""
    reason = decided.non_reentrant_checkpointing
    if reason is None or model_args.disable_gradient_checkpointing or not model_args.use_reentrant_gc:
        return
    from llamafactory.extras import logging

    from ._surfaces import PARSER

    model_args.use_reentrant_gc = False
    logging.get_logger(PARSER).info_rank0(  # under `llamafactory`, whose handler LLaMA-Factory sets: the line shows
        f"BlockLLM under {decided.describe()}: `use_reentrant_gc` set to false ({reason})."
    )

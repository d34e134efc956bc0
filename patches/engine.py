"""Which engine a ``finetuning_type: blockllm`` run trains on, read once from the training arguments, and the
optimizer class that serves it.

* DeepSpeed ZeRO-1/2/3 (the ``deepspeed`` training argument): :class:`blockllm_factory.optim.zero.ZeroBlockLLM`,
  the client optimizer DeepSpeed wraps; it clips over the selected blocks itself (DeepSpeed's clipping is turned off
  at parse time, :func:`.deepspeed_config.leave_clipping_to_blockllm`).
* One process or DDP: :class:`blockllm_factory.optim.BlockLLM`.

The optimizer patch (:mod:`.optimizer`) builds the optimizer with :func:`blockllm_optimizer_class`; the trainer patch
wires the loss feed and the engine's callbacks by the same choice (:mod:`.engine_wiring`).
"""

import functools


def uses_deepspeed_zero(training_args) -> bool:
    return bool(getattr(training_args, "deepspeed", None))


def blockllm_optimizer_class(training_args):
    """BlockLLM, or under DeepSpeed ZeRO the variant that DeepSpeed can wrap (see blockllm_factory/optim/zero.py)."""
    if uses_deepspeed_zero(training_args):
        from blockllm_factory.optim.zero import ZeroBlockLLM

        # The optimizer clips over the selected blocks itself; DeepSpeed's clipping is off (see deepspeed_config.py).
        return functools.partial(ZeroBlockLLM, max_grad_norm=float(training_args.max_grad_norm or 0.0))
    from blockllm_factory.optim import BlockLLM

    return BlockLLM

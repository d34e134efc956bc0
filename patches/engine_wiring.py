"""The trainer side of the engines: where the loss feed sits, and what each engine adds to a trainer's callbacks.

Called by :func:`.trainer.attach` when a trainer's optimizer is BlockLLM. The engine is read once, from the training
arguments (:mod:`.engine`), and decides:

* where each micro-step's loss reaches the feed (:func:`install_loss_feed`, once per trainer): after
  ``training_step`` returns (one process, DDP), or inside ``accelerator.backward`` under DeepSpeed, whose
  ``engine.step()`` runs in that backward, before the trainer's callbacks: the step's loss is recorded before
  DeepSpeed calls the optimizer.
* DDP: probed blocks are measured on the averaged gradients (a communication hook, registered at train begin).
* fp16 loss scaling (GradScaler): probed gradients are measured scaled, so BlockLLM divides by the scale; a step the
  scaler (or DeepSpeed's overflow check) skipped is reported to BlockLLM, which keeps states and selection.
"""

import functools

from .engine import uses_deepspeed_zero


def install_loss_feed(trainer) -> None:
    """Adds every micro-step's loss to ``trainer._blockllm_feed`` (the feed of its current optimizer), where the
    trainer's engine allows; called once per trainer, the feed itself may be replaced later."""
    if uses_deepspeed_zero(trainer.args):
        accelerator = trainer.accelerator
        backward = accelerator.backward

        @functools.wraps(backward)
        def backward_feeding_blockllm(loss, **kwargs):
            feed = trainer._blockllm_feed
            feed.add(loss)  # the same (accumulation-scaled) loss training_step returns
            if accelerator.sync_gradients:
                feed.flush()  # DeepSpeed's engine.step() runs inside this backward
            return backward(loss, **kwargs)

        accelerator.backward = backward_feeding_blockllm
        return
    training_step = trainer.training_step

    @functools.wraps(training_step)
    def training_step_feeding_blockllm(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        trainer._blockllm_feed.add(loss)
        return loss

    trainer.training_step = training_step_feeding_blockllm


def attach_engine(trainer, optimizer, logger) -> None:
    """Connects BlockLLM to the engine's loss scaling and skipped steps; called once per optimizer."""
    accelerator = trainer.accelerator
    if not uses_deepspeed_zero(trainer.args) and accelerator.scaler is not None:
        optimizer.probe_grad_scale = accelerator.scaler.get_scale
    previous = getattr(trainer, "_blockllm_engine_callback", None)
    if previous is not None:
        trainer.remove_callback(previous)
    callback = _build_engine_callback(trainer, optimizer, logger)
    trainer.add_callback(callback)
    trainer._blockllm_engine_callback = callback


def _build_engine_callback(trainer, optimizer, logger):
    from transformers import TrainerCallback

    class BlockLLMEngineCallback(TrainerCallback):
        def __init__(self) -> None:
            self.skipped = 0

        def on_train_begin(self, args, state, control, **kwargs):
            from torch.nn.parallel import DistributedDataParallel

            from blockllm_factory.optim.distributed import register_ddp_probe_hook

            self.skipped = optimizer.skipped_steps
            model = trainer.model_wrapped
            if isinstance(model, DistributedDataParallel) and not getattr(model, "_blockllm_probe_hook", False):
                register_ddp_probe_hook(model, optimizer)
                model._blockllm_probe_hook = True

        def on_optimizer_step(self, args, state, control, **kwargs):
            reason = "non-finite loss or gradient"
            if trainer.accelerator.optimizer_step_was_skipped:  # the GradScaler or DeepSpeed did not call step()
                reason = "inf/NaN gradients found by the loss scaler or DeepSpeed"
                optimizer.skip_step(reason)
            if optimizer.skipped_steps > self.skipped:
                self.skipped = optimizer.skipped_steps
                logger.warning_rank0(
                    f"BlockLLM: optimizer step {state.global_step + 1} skipped ({reason}); weights, optimizer states "
                    f"and selection kept, training goes on ({optimizer.skipped_steps} skipped so far)."
                )

    return BlockLLMEngineCallback()

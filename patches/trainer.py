"""Surface ``llamafactory.train.{pt,sft,rm,dpo,kto}.trainer``: BlockLLM's loss feed, clipping and telemetry.

Each stage's trainer class creates its optimizer in ``create_optimizer``; the wrapper added here tells the optimizer
factory the run's length and, once the optimizer is a BlockLLM, connects that trainer instance to the wiring both
fronts share (:mod:`blockllm_factory.hf.wiring`: the loss feed before each optimizer step, clipping by the selection's
norm, the selection log, and with ``plot_loss: true`` its plot, the engine's callbacks), and records checksums and
block settings beside each checkpoint's optimizer state (:mod:`.checkpoints`).
"""

import functools

from blockllm_factory.hf.wiring import connect, find_blockllm
from blockllm_factory.optim.settings import FINETUNING_TYPE

from ._version import check_llamafactory_version

# Trainer module -> the class in it whose optimizer LLaMA-Factory creates with create_custom_optimizer.
TRAINER_CLASSES = {
    "llamafactory.train.pt.trainer": "CustomTrainer",
    "llamafactory.train.sft.trainer": "CustomSeq2SeqTrainer",
    "llamafactory.train.rm.trainer": "PairwiseTrainer",
    "llamafactory.train.dpo.trainer": "CustomDPOTrainer",
    "llamafactory.train.kto.trainer": "CustomKTOTrainer",
}


def attach(trainer, logger) -> None:
    """Connects a trainer whose optimizer is BlockLLM to its loss feed, clipping, telemetry and engine (the wiring both
    fronts share, :func:`blockllm_factory.hf.wiring.connect`)."""
    optimizer = find_blockllm(trainer.optimizer)
    if optimizer is None:  # never train "blockllm" with some other optimizer
        raise RuntimeError(
            f"`finetuning_type: blockllm` but the trainer's optimizer is {type(trainer.optimizer).__name__}; "
            "the blockllm-factory optimizer patch did not run."
        )
    first = getattr(trainer, "_blockllm_optimizer", None) is None
    connect(trainer, optimizer, logger, plot=bool(trainer.finetuning_args.plot_loss))
    if first:
        _record_checkpoints(trainer)
        _save_together(trainer)


def _save_together(trainer) -> None:
    """Across processes, every rank leaves ``save_model`` once the model is written (LLaMA-Factory's stages call it on
    every rank; rank 0 writes alone). A rank that went on would reach the end of its process first, and a rank that
    aborts in torch's teardown there (a rare gloo flake, docs/distributed.md "Known flake") made torchrun stop rank 0
    while it was still writing the model. Not installed by the Trainer front: user code may call ``save_model`` on
    rank 0 only, where a barrier would never return."""
    original_save = trainer.save_model

    @functools.wraps(original_save)
    def save_model_then_wait(*args, **kwargs):
        result = original_save(*args, **kwargs)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return result

    trainer.save_model = save_model_then_wait


def _record_checkpoints(trainer) -> None:
    """Checksums and block settings beside each checkpoint's optimizer state (checkpoints.py), written right after
    the Trainer saved it and before ``trainer_state.json``, so that a complete checkpoint always has them."""
    original_save = trainer._save_optimizer_and_scheduler

    @functools.wraps(original_save)
    def save_optimizer_and_scheduler(output_dir):
        original_save(output_dir)
        if trainer.args.should_save:
            from .checkpoints import write_checkpoint_record

            write_checkpoint_record(output_dir, trainer.finetuning_args, find_blockllm(trainer.optimizer))

    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler


def build_create_optimizer(original, logger):
    @functools.wraps(original)
    def create_optimizer(self, *args, **kwargs):
        from .optimizer import run_steps

        # The Trainer has set state.max_steps (from max_steps, or epochs x batches) before it creates the optimizer:
        # a `blockllm_patience` given as a share of the run is resolved against it (optimizer.py).
        with run_steps(getattr(getattr(self, "state", None), "max_steps", None)):
            optimizer = original(self, *args, **kwargs)
        if self.finetuning_args.finetuning_type == FINETUNING_TYPE:
            attach(self, logger)
        return optimizer

    return create_optimizer


def apply(module) -> None:
    check_llamafactory_version()
    from llamafactory.extras import logging

    trainer_class = getattr(module, TRAINER_CLASSES[module.__name__])
    wrapped = build_create_optimizer(trainer_class.__dict__["create_optimizer"], logging.get_logger(module.__name__))
    trainer_class.create_optimizer = wrapped

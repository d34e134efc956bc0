"""BlockLLM in a transformers ``Trainer`` or a TRL trainer: ``BlockLLMTrainer``, ``make_blockllm_trainer(cls)``.

The Trainer's own ``create_optimizer`` hands the optimizer only the parameters that require grad, without their
names, and its loop calls ``optimizer.step()`` without a loss and clips ``model.parameters()``. BlockLLM needs every
candidate parameter by name, the loss of each optimizer step, and clipping by the selection's norm (its compact
gradients live in the optimizer). The mixin replaces ``create_optimizer`` only: it builds BlockLLM with the builder
LLaMA-Factory's front uses (:mod:`.optimizer`) and connects the trainer to the same wiring (:mod:`.wiring`: loss feed,
clipping, selection log, the engine's callbacks). Everything else is the Trainer's: scheduler, gradient accumulation,
mixed precision, checkpoints (the optimizer's ``state_dict`` carries the selection, so resuming is exact), DDP and
DeepSpeed ZeRO (which then creates the optimizer through ``create_optimizer``: ZeroBlockLLM).
"""

import dataclasses

from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from blockllm_factory.optim.settings import EMBEDDINGS_AUTO

from .config import BlockLLMConfig
from .deepspeed_config import prepare_deepspeed
from .engine import check_ddp, check_optim, check_optimizer_values, engine_of
from .optimizer import build_optimizer
from .serialization import adopted_setting, check_state_files, saved_include_embeddings
from .wiring import connect, find_blockllm, rank0_logger

METHOD = "a BlockLLM trainer"  # how refusals name this front (LLaMA-Factory's say `finetuning_type: blockllm`)
logger = rank0_logger(__name__)


def check_training_arguments(args, config: BlockLLMConfig) -> None:
    """Refuses the training arguments BlockLLM cannot serve through the Trainer front, naming the argument; sets what
    BlockLLM needs under DeepSpeed (its clipping off: BlockLLM clips) and DDP (DDP's search for unused parameters), and
    non-reentrant gradient checkpointing under DDP and ZeRO-3 (``Engine.non_reentrant_checkpointing``)."""
    check_optim(args, METHOD)
    check_optimizer_values(args)  # the YAML path's messages: `learning_rate` must be ..., not `lr`
    check_ddp(args, METHOD)
    decided = engine_of(args)  # decided once for these arguments; the optimizer and the wiring read the same
    if decided.deepspeed:
        prepare_deepspeed(args, config, METHOD)
    reason = decided.non_reentrant_checkpointing  # DDP and ZeRO-3: the engine says why
    if reason is not None and args.gradient_checkpointing:
        kwargs = dict(args.gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            logger.info_rank0(
                f"BlockLLM under {decided.describe()}: gradient checkpointing switched to `use_reentrant: False` "
                f"({reason})."
            )
        args.gradient_checkpointing_kwargs = {**kwargs, "use_reentrant": False}


class BlockLLMTrainerMixin:
    """Put before a ``Trainer`` class (``class MyTrainer(BlockLLMTrainerMixin, SFTTrainer)``, or
    :func:`make_blockllm_trainer`) to train with BlockLLM; takes ``blockllm_config=BlockLLMConfig(...)`` besides the
    trainer's own arguments (default: the YAML's defaults)."""

    def __init__(self, *args, blockllm_config: BlockLLMConfig | None = None, **kwargs) -> None:
        config = BlockLLMConfig() if blockllm_config is None else blockllm_config
        if not isinstance(config, BlockLLMConfig):
            raise TypeError(f"`blockllm_config` must be a BlockLLMConfig, got {type(config).__name__}.")
        optimizers = kwargs.get("optimizers") or (None, None)
        if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                f"`optimizers` / `optimizer_cls_and_kwargs` cannot be combined with {METHOD} (BlockLLM is itself "
                "the optimizer); remove it (a scheduler alone may be given as `optimizers=(None, scheduler)`)."
            )
        self.blockllm_config = config
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args, config)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay_names = set(self.get_decay_parameter_names(opt_model))
            # The Trainer has set state.max_steps (max_steps, or epochs x batches) before it creates the optimizer.
            self.optimizer = build_optimizer(
                opt_model, self.args, self._resumed_config(), decay_names, logger, self.state.max_steps
            )
            connect(self, self.optimizer, logger)
        return self.optimizer

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # The Trainer creates the optimizer inside train(), before it loads the checkpoint's state: keep which one.
        self._blockllm_resume = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resumed_config(self) -> BlockLLMConfig:
        """The config, with ``blockllm_include_embeddings: auto`` taking the value of the checkpoint this run resumes
        (as LLaMA-Factory's front does at parse time, ``patches/checkpoints.py``), said in the log; a value set by hand
        is kept (a checkpoint of the other value is then refused when its state loads, naming the field)."""
        config, checkpoint = self.blockllm_config, getattr(self, "_blockllm_resume", None)
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if not isinstance(checkpoint, str) or config.blockllm_include_embeddings != EMBEDDINGS_AUTO:
            return config
        saved = saved_include_embeddings(checkpoint)
        if saved is None:
            return config
        logger.info_rank0(adopted_setting("blockllm_include_embeddings", EMBEDDINGS_AUTO, checkpoint, saved))
        return dataclasses.replace(config, blockllm_include_embeddings=saved)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # The Trainer skips a missing optimizer.pt / scheduler.pt without a word; BlockLLM would silently restart.
        if checkpoint is not None:
            restart = f"load the model from {checkpoint}, no `resume_from_checkpoint`"
            check_state_files(checkpoint, engine_of(self.args).deepspeed, restart)
        return super()._load_optimizer_and_scheduler(checkpoint)

    @property
    def blockllm_optimizer(self):
        """The BlockLLM optimizer (``self.optimizer`` is accelerate's wrapper of it once training starts)."""
        return find_blockllm(self.optimizer)


def make_blockllm_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer`` or a subclass: TRL's ``SFTTrainer``, ``DPOTrainer``, ...) training with
    BlockLLM: a subclass with :class:`BlockLLMTrainerMixin` first."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"`trainer_class` must be transformers.Trainer or a subclass, got {trainer_class!r}.")
    return type(f"BlockLLM{trainer_class.__name__}", (BlockLLMTrainerMixin, trainer_class), {"__module__": __name__})


BlockLLMTrainer = make_blockllm_trainer(Trainer)

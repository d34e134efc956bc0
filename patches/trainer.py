"""Surface ``llamafactory.train.{pt,sft,rm,dpo,kto}.trainer``: loss feed and selection telemetry.

Each stage's trainer class creates its optimizer in ``create_optimizer``; the wrapper added here, once the optimizer is
a BlockLLM, attaches two things to that trainer instance:

* the loss feed: ``training_step`` is wrapped to add up the (detached) losses it already returns, which the Trainer
  has scaled for gradient accumulation, so their sum over an optimizer step's micro-steps is the step's mean loss,
  the number the Trainer logs. A callback hands it to ``record_loss`` in ``on_pre_optimizer_step``, right before
  ``optimizer.step()``: once per optimizer step, with no extra forward pass. (Under DeepSpeed the feed sits in
  ``accelerator.backward`` instead; the engine is chosen once per trainer, see :mod:`.engine_wiring`.)
* clipping: the Trainer's ``_clip_grad_norm`` (and ``_get_grad_norm``, which logs the norm when nothing is clipped)
  measure the selected blocks before clipping and, with compact gradients, clip them where they are: in the
  optimizer's carrier, through ``BlockLLM.clip_grad_norm_``.
* telemetry: each (re)selection is logged through LLaMA-Factory's logger and appended to
  ``output_dir/blockllm_selection.jsonl``; with ``plot_loss: true``, ``output_dir/blockllm_selection.png`` shows
  which blocks were updated at each step.
"""

import functools

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


def find_blockllm(optimizer):
    """The BlockLLM inside accelerate's ``AcceleratedOptimizer`` (or any wrapper exposing ``.optimizer``)."""
    from blockllm_factory.optim import BlockLLM

    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, BlockLLM):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class LossFeed:
    """Adds up a trainer's micro-step losses and feeds their total to ``record_loss`` once per optimizer step."""

    def __init__(self, trainer, optimizer) -> None:
        self.trainer = trainer
        self.optimizer = optimizer
        self.total = None
        self.micro_steps = 0

    def add(self, loss) -> None:
        loss = loss.detach().float()
        self.total = loss if self.total is None else self.total + loss  # stays on device: no sync per micro-step
        self.micro_steps += 1

    def flush(self) -> float | None:
        if self.total is None:
            return None
        # Same value on every rank, so that ranks could never disagree about the loss rule.
        total = self.trainer.accelerator.reduce(self.total, reduction="mean")
        self.total, self.micro_steps = None, 0
        value = float(total)
        self.optimizer.record_loss(value)
        return value


def nothing_trained(steps: int) -> str:
    return (
        f"BlockLLM: the run ended after {steps} optimizer step(s), before BlockLLM's first update: its first step "
        "only measures every block to make the first selection, so the weights saved are the ones it started from; "
        "train for at least 2 optimizer steps."
    )


def build_callback(feed: LossFeed, optimizer, output_dir: str, plot: bool, model_order: list[str], logger):
    from transformers import TrainerCallback

    from . import telemetry

    class BlockLLMCallback(TrainerCallback):
        """Feeds the loss before each optimizer step and records every (re)selection BlockLLM makes."""

        def __init__(self) -> None:
            self.logged = 0

        def _records(self, events):
            return [telemetry.event_record(event, optimizer.budget, optimizer.eligible_numel) for event in events]

        def on_train_begin(self, args, state, control, **kwargs):
            # Events restored from a checkpoint are rewritten, so the file always matches the optimizer's record.
            events = optimizer.selection_events
            self.logged = len(events)
            if state.is_world_process_zero:
                path = telemetry.output_path(output_dir, telemetry.SELECTION_LOG)
                telemetry.write_log(path, self._records(events), append=False)
                if events:
                    logger.info_rank0(f"BlockLLM resumed with {len(events)} selection(s); last selection:")
                    logger.info_rank0(telemetry.describe(self._records(events[-1:])[0]))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            feed.flush()

        def on_step_end(self, args, state, control, **kwargs):
            self._record_new(state)

        def _record_new(self, state) -> None:
            events = optimizer.selection_events
            new = self._records(events[self.logged :])
            self.logged = len(events)
            if not new or not state.is_world_process_zero:
                return
            for record in new:
                logger.info_rank0(telemetry.describe(record))
            telemetry.write_log(telemetry.output_path(output_dir, telemetry.SELECTION_LOG), new, append=True)

        def on_train_end(self, args, state, control, **kwargs):
            self._record_new(state)
            if optimizer.selection["step"] <= 1:
                logger.warning_rank0(nothing_trained(optimizer.selection["step"]))
            if plot and state.is_world_process_zero:
                events = optimizer.selection_events
                rows = telemetry.block_order(events, model_order, getattr(optimizer, "block_names", None))
                path = telemetry.save_plot(
                    telemetry.output_path(output_dir, telemetry.SELECTION_PLOT),
                    events,
                    rows,
                    int(optimizer.selection["step"]),
                )
                if path:
                    logger.info_rank0(f"BlockLLM selection plot saved at: {path}")

    return BlockLLMCallback()


def attach(trainer, logger) -> None:
    """Connects a trainer whose optimizer is BlockLLM to its loss feed and telemetry (once per optimizer).

    The wrappers of the trainer's methods are installed once per trainer and read the current optimizer and feed
    (``trainer._blockllm_optimizer``, ``trainer._blockllm_feed``), so a trainer that creates another optimizer only
    gets new callbacks."""
    optimizer = find_blockllm(trainer.optimizer)
    if optimizer is None:  # never train "blockllm" with some other optimizer
        raise RuntimeError(
            f"`finetuning_type: blockllm` but the trainer's optimizer is {type(trainer.optimizer).__name__}; "
            "the blockllm-factory optimizer patch did not run."
        )
    previous_optimizer = getattr(trainer, "_blockllm_optimizer", None)
    if previous_optimizer is optimizer:
        return
    feed = LossFeed(trainer, optimizer)
    model_order = [name for name, _ in trainer.model.named_parameters()]
    callback = build_callback(
        feed, optimizer, trainer.args.output_dir, bool(trainer.finetuning_args.plot_loss), model_order, logger
    )
    previous = getattr(trainer, "_blockllm_callback", None)
    if previous is not None:
        trainer.remove_callback(previous)
    trainer.add_callback(callback)
    trainer._blockllm_callback = callback
    trainer._blockllm_optimizer = optimizer
    trainer._blockllm_feed = feed
    # DDP/DeepSpeed/GradScaler specifics (loss feed timing, probe norms, skipped steps): see engine_wiring.py.
    from .engine_wiring import attach_engine, install_loss_feed

    if previous_optimizer is None:
        install_loss_feed(trainer)
        _measure_before_clipping(trainer)
        _record_checkpoints(trainer)
    attach_engine(trainer, optimizer, logger)


def _record_checkpoints(trainer) -> None:
    """Checksums and block settings beside each checkpoint's optimizer state (checkpoints.py), written right after
    the Trainer saved it and before ``trainer_state.json``, so that a complete checkpoint always has them."""
    original_save = trainer._save_optimizer_and_scheduler

    @functools.wraps(original_save)
    def save_optimizer_and_scheduler(output_dir):
        original_save(output_dir)
        if trainer.args.should_save:
            from .checkpoints import write_checkpoint_record

            write_checkpoint_record(output_dir, trainer.finetuning_args)

    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler


def _measure_before_clipping(trainer) -> None:
    """Selected blocks enter the norm table unclipped, like the probed ones (measured during backward); compact
    gradients are clipped where they live. Installed once per trainer, for its current optimizer."""
    original_clip = trainer._clip_grad_norm

    @functools.wraps(original_clip)
    def clip_grad_norm_after_measuring(model):
        optimizer = trainer._blockllm_optimizer
        optimizer.measure_gradients()
        if optimizer.gradient_carrier is None:
            return original_clip(model)
        # Compact gradients live in the optimizer's carrier, which model.parameters() does not reach; the GradScaler
        # unscales them through the optimizer's param_groups, as accelerate's clip_grad_norm_ does first.
        trainer.accelerator.unscale_gradients()
        return optimizer.clip_grad_norm_(trainer.args.max_grad_norm, model.parameters())

    trainer._clip_grad_norm = clip_grad_norm_after_measuring
    original_get_norm = trainer._get_grad_norm

    @functools.wraps(original_get_norm)
    def get_grad_norm_with_compact_gradients(model, grad_norm=None):
        optimizer = trainer._blockllm_optimizer
        if grad_norm is None and optimizer.gradient_carrier is not None:  # max_grad_norm 0: the norm for the log only
            trainer.accelerator.unscale_gradients()
            grad_norm = optimizer.clip_grad_norm_(float("inf"), model.parameters())
        return original_get_norm(model, grad_norm=grad_norm)

    trainer._get_grad_norm = get_grad_norm_with_compact_gradients


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

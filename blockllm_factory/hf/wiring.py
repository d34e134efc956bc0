"""The trainer side of BlockLLM, shared by both fronts: what a transformers ``Trainer`` whose optimizer is BlockLLM
needs added, wherever the Trainer comes from (LLaMA-Factory's stage trainers through ``patches/trainer.py``, a user's
``Trainer`` or TRL trainer through :mod:`blockllm_factory.hf.trainer`). :func:`connect` attaches, once per optimizer:

* the loss feed: ``training_step`` is wrapped to add up the (detached) losses it already returns, which the Trainer
  has scaled for gradient accumulation, so their sum over an optimizer step's micro-steps is the step's mean loss,
  the number the Trainer logs. A callback hands it to ``record_loss`` in ``on_pre_optimizer_step``, right before
  ``optimizer.step()``: once per optimizer step, with no extra forward pass. Under DeepSpeed, whose ``engine.step()``
  runs inside ``accelerator.backward`` before the trainer's callbacks, the feed sits in that backward instead.
* clipping: the Trainer's ``_clip_grad_norm`` (and ``_get_grad_norm``, which logs the norm when nothing is clipped)
  measure the selected blocks before clipping and, with compact gradients, clip them where they are: in the
  optimizer's carrier, through ``BlockLLM.clip_grad_norm_``.
* telemetry: each (re)selection is logged and appended to ``output_dir/blockllm_selection.jsonl``; with ``plot``,
  ``output_dir/blockllm_selection.png`` shows which blocks were updated at each step (:mod:`.telemetry`).
* the engine: under DDP BlockLLM's weights are left out of DDP's reducer when accelerate wraps the model (DDP would
  hold and all-reduce a gradient-sized bucket for them), and BlockLLM averages its own gradients across ranks right
  after the backward of each optimizer step's last micro-step (the selection's blocks and the probed tensors, one
  all-reduce); under fp16 loss scaling (GradScaler) probed gradients are measured scaled, so BlockLLM divides by the
  scale; a step the scaler (or DeepSpeed's overflow check) skipped is reported to BlockLLM, which keeps states and
  selection; under DeepSpeed ZeRO-1/2 the rebuild of its partitions is handed DeepSpeed's engine once accelerate has
  created it.

``logger`` is any object with ``info_rank0`` and ``warning_rank0`` (LLaMA-Factory's logger, or :func:`rank0_logger`).
"""

import functools
import os

from .engine import engine_of


class _Rank0Logger:
    """transformers' logger with the two methods the shared code calls; messages only from the first local process."""

    def __init__(self, name: str) -> None:
        from transformers.utils import logging

        self._logger = logging.get_logger(name)

    @staticmethod
    def _first() -> bool:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    def info_rank0(self, message: str) -> None:
        if self._first():
            self._logger.info(message)

    def warning_rank0(self, message: str) -> None:
        if self._first():
            self._logger.warning(message)


def rank0_logger(name: str) -> _Rank0Logger:
    return _Rank0Logger(name)


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
                    getattr(optimizer, "block_sizes", None),
                )
                if path:
                    logger.info_rank0(f"BlockLLM selection plot saved at: {path}")

    return BlockLLMCallback()


def connect(trainer, optimizer, logger, plot: bool = False) -> None:
    """Connects ``trainer``, whose optimizer is the BlockLLM ``optimizer``, to its loss feed, clipping, telemetry and
    engine (once per optimizer).

    The wrappers of the trainer's methods are installed once per trainer and read the current optimizer and feed
    (``trainer._blockllm_optimizer``, ``trainer._blockllm_feed``), so a trainer that creates another optimizer only
    gets new callbacks."""
    previous_optimizer = getattr(trainer, "_blockllm_optimizer", None)
    if previous_optimizer is optimizer:
        return
    feed = LossFeed(trainer, optimizer)
    model_order = [name for name, _ in trainer.model.named_parameters()]
    callback = build_callback(feed, optimizer, trainer.args.output_dir, plot, model_order, logger)
    previous = getattr(trainer, "_blockllm_callback", None)
    if previous is not None:
        trainer.remove_callback(previous)
    trainer.add_callback(callback)
    trainer._blockllm_callback = callback
    trainer._blockllm_optimizer = optimizer
    trainer._blockllm_feed = feed
    if previous_optimizer is None:
        install_loss_feed(trainer)
        _measure_before_clipping(trainer)
        if engine_of(trainer.args).averages_gradients:
            _average_instead_of_ddp(trainer)
        if engine_of(trainer.args).rebuilds_partitions:
            _hand_deepspeed_engine_to_partitions(trainer)
    attach_engine(trainer, optimizer, logger)


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


def _average_instead_of_ddp(trainer) -> None:
    """Under DDP: BlockLLM's weights stay out of DDP's reducer, and BlockLLM averages its gradients after the backward
    of each optimizer step's last micro-step, before the Trainer clips them. Installed once per trainer (before
    accelerate wraps the model: the Trainer creates the optimizer first)."""
    accelerator = trainer.accelerator
    prepare_model = accelerator.prepare_model

    @functools.wraps(prepare_model)
    def prepare_model_without_blockllm_weights(model, *args, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        owned = {id(param) for param in trainer._blockllm_optimizer.param_by_name.values()}
        if not any(param.requires_grad and id(param) not in owned for param in model.parameters()):
            # Nothing left for DDP's reducer, and DDP refuses a model whose trainable parameters it must all ignore:
            # no DDP at all. accelerate's evaluation mode skips only the wrapping (placement and autocast stay).
            return prepare_model(model, *args, **{**kwargs, "evaluation_mode": True})
        names = [name for name, param in model.named_parameters() if id(param) in owned]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return prepare_model(model, *args, **kwargs)

    accelerator.prepare_model = prepare_model_without_blockllm_weights
    backward = accelerator.backward

    @functools.wraps(backward)
    def backward_then_average(loss, **kwargs):
        result = backward(loss, **kwargs)
        if accelerator.sync_gradients:  # the optimizer step's last micro-step
            optimizer = trainer._blockllm_optimizer
            optimizer.reduce_gradients()
        return result

    accelerator.backward = backward_then_average


def _hand_deepspeed_engine_to_partitions(trainer) -> None:
    """Under DeepSpeed ZeRO-1/2 the rebuild of the partitions re-runs the engine's own constructor path of its
    optimizer (:mod:`.zero12`), so it is handed the engine as soon as accelerate has created it, before a checkpoint
    is loaded into it. Installed once per trainer (before accelerate prepares: the Trainer creates the optimizer
    first); ZeRO-3's rebuild finds its optimizer through the parameters and takes nothing."""
    accelerator = trainer.accelerator
    prepare = accelerator.prepare

    @functools.wraps(prepare)
    def prepare_then_hand_over(*args, **kwargs):
        result = prepare(*args, **kwargs)
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        attach = getattr(getattr(trainer._blockllm_optimizer, "partitions", None), "attach", None)
        if wrapped is not None and attach is not None:
            attach(wrapped.engine)
        return result

    accelerator.prepare = prepare_then_hand_over


def install_loss_feed(trainer) -> None:
    """Adds every micro-step's loss to ``trainer._blockllm_feed`` (the feed of its current optimizer), where the
    trainer's engine allows; called once per trainer, the feed itself may be replaced later."""
    if engine_of(trainer.args).loss_in_backward:
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
    # DeepSpeed scales and checks its own gradients; a GradScaler's scale is bound where BlockLLM's hooks measure.
    if not engine_of(trainer.args).deepspeed and accelerator.scaler is not None:
        optimizer.probe_grad_scale = accelerator.scaler.get_scale
    if engine_of(trainer.args).averages_gradients:
        optimizer.average_gradients_across_ranks()
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
            self.skipped = optimizer.skipped_steps

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

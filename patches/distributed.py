"""Multi-process training of ``finetuning_type: blockllm``: what is checked and adjusted at parse time.

Called from :mod:`.parser` (the wrapper of ``_check_extra_dependencies``, which sees the model, fine-tuning and
training arguments before anything is loaded). It does not import DeepSpeed or touch torch.distributed.

Plain DDP (``FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train``):

* BlockLLM switches ``requires_grad`` during the run. DDP builds its reducer over the parameters that require grad
  when the model is wrapped (HF Trainer creates the optimizer first, and BlockLLM's first step probes every eligible
  block, so all of them are in the reducer); at each step only the selected and probed ones produce gradients. DDP
  must therefore look for unused parameters every step: ``ddp_find_unused_parameters`` is set to true (an explicit
  ``false`` is refused), and a static graph is refused.
* Reentrant gradient checkpointing runs the checkpointed forward again inside backward, where DDP's search for unused
  parameters cannot see it; it is switched to the non-reentrant kind (``use_reentrant_gc: false``) with a log line.

DeepSpeed: see :mod:`blockllm_factory.optim.zero` for how BlockLLM runs inside ZeRO-1/2/3.
"""

from typing import Any

FINETUNING_TYPE = "blockllm"


def _deepspeed_config(training_args) -> dict[str, Any]:
    """The DeepSpeed config as a dict (``deepspeed:`` may hold a path or a dict), read without importing DeepSpeed."""
    import json

    config = training_args.deepspeed
    if isinstance(config, dict):
        return config
    with open(config, encoding="utf-8") as file:
        return json.load(file)


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Refuses the DeepSpeed settings that BlockLLM's ZeRO adapter does not serve; errors name the key."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"`zero_optimization.stage` must be 1, 2 or 3 with `finetuning_type: blockllm`, got {stage!r} "
            "(for plain data parallelism without ZeRO, launch without `deepspeed`: BlockLLM runs under DDP)."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"`zero_optimization.{key}.device: {device}` cannot be combined with `finetuning_type: blockllm` "
                "(BlockLLM updates DeepSpeed's fp32 partition in place on the training device); set it to `none`."
            )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "`zero_optimization.elastic_checkpoint: true` cannot be combined with `finetuning_type: blockllm` (its "
            "optimizer state is saved per rank, not as flat tensors); remove it."
        )
    if "optimizer" in config:
        raise ValueError(
            "The DeepSpeed config has an `optimizer` section, which would replace BlockLLM; remove it "
            "(`finetuning_type: blockllm` builds the optimizer itself)."
        )
    if config.get("zero_allow_untested_optimizer") is not True:
        raise ValueError(
            "Set `zero_allow_untested_optimizer: true` in the DeepSpeed config: BlockLLM is a client optimizer that "
            "DeepSpeed does not know by name (see recipes/deepspeed/)."
        )


def leave_clipping_to_blockllm(training_args) -> None:
    """Turns DeepSpeed's gradient clipping off; ZeroBlockLLM clips with ``max_grad_norm`` over the selected blocks.

    DeepSpeed would clip by the norm of every gradient it reduced, the probed blocks' included, which one process never
    does (the probe hooks free those gradients before the Trainer clips). ``gradient_clipping: auto`` has already been
    filled from ``max_grad_norm`` when the arguments were built; an explicit value must agree with ``max_grad_norm``.
    """
    config = training_args.hf_deepspeed_config.config
    clipping = config.get("gradient_clipping", 0.0)
    if clipping not in (0, 0.0) and float(clipping) != float(training_args.max_grad_norm or 0.0):
        raise ValueError(
            f"`gradient_clipping: {clipping}` in the DeepSpeed config differs from `max_grad_norm: "
            f"{training_args.max_grad_norm}`; with `finetuning_type: blockllm` set `gradient_clipping: auto` and "
            "choose the value with `max_grad_norm`."
        )
    config["gradient_clipping"] = 0.0


def connect_deepspeed_comm() -> None:
    """Lets DeepSpeed's communication layer use the process group that accelerate has already created.

    On CPU (``use_cpu: true``) nothing calls ``deepspeed.init_distributed`` before the model is loaded, so ZeRO-3's
    ``zero.Init`` (run inside ``from_pretrained``) sees DeepSpeed's backend unset, takes the world size for 1 and
    refuses the batch settings ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
    world_size"). With the existing torch.distributed group registered first, it sees the real world size. On GPU
    HF has already done this, and the call is a no-op.
    """
    import torch.distributed

    if not torch.distributed.is_initialized():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


# ---------------------------------------------------------------------------------------------------- checkpoints
COMPLETION_MARKER = "trainer_state.json"  # the Trainer writes it last when it saves a checkpoint


def _checkpoint_step(name: str) -> int | None:
    prefix = "checkpoint-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def checkpoints_in(folder: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of the ``checkpoint-N`` folders in ``folder``, oldest first."""
    import os

    found = []
    for name in os.listdir(folder):
        step, path = _checkpoint_step(name), os.path.join(folder, name)
        if step is not None and os.path.isdir(path):
            found.append((step, path, os.path.isfile(os.path.join(path, COMPLETION_MARKER))))
    return sorted(found)


def check_resume_checkpoint(training_args, logger=None) -> None:
    """A checkpoint whose save was interrupted (a killed process) is never resumed from.

    The Trainer writes a checkpoint's files in place and ``trainer_state.json`` last, so a process killed while saving
    leaves ``checkpoint-N`` without it, next to the intact previous checkpoint. Resuming from the broken one fails late
    (or, for the model-only files, silently loads a half-written optimizer state). So: an explicit
    ``resume_from_checkpoint`` naming an incomplete checkpoint is refused with the previous complete one named; and
    when LLaMA-Factory would pick up the last checkpoint of ``output_dir`` by itself, the last *complete* one is
    chosen.
    """
    import os

    explicit = training_args.resume_from_checkpoint
    if explicit:
        is_checkpoint = _checkpoint_step(os.path.basename(os.path.normpath(explicit))) is not None
        if is_checkpoint and os.path.isdir(explicit) and not os.path.isfile(os.path.join(explicit, COMPLETION_MARKER)):
            parent = os.path.dirname(os.path.abspath(explicit))
            complete = [path for _, path, done in checkpoints_in(parent) if done]
            hint = f"resume from {complete[-1]}" if complete else "no complete checkpoint is next to it"
            raise ValueError(
                f"`resume_from_checkpoint: {explicit}` is an incomplete checkpoint (no {COMPLETION_MARKER}: its save "
                f"was interrupted); {hint}."
            )
        return
    output_dir = training_args.output_dir
    if not (training_args.do_train and os.path.isdir(output_dir)) or getattr(
        training_args, "overwrite_output_dir", False
    ):
        return
    found = checkpoints_in(output_dir)
    if not found or found[-1][2]:
        return  # nothing to resume, or the last checkpoint is complete: LLaMA-Factory's own choice is right
    complete = [path for _, path, done in found if done]
    if not complete:
        raise ValueError(
            f"{found[-1][1]} is an incomplete checkpoint (no {COMPLETION_MARKER}: its save was interrupted) and "
            "`output_dir` holds no complete one; delete it, or set `overwrite_output_dir: true` to start afresh."
        )
    if logger is not None:
        logger.warning_rank0(
            f"{found[-1][1]} is incomplete (no {COMPLETION_MARKER}: its save was interrupted); resuming from "
            f"{complete[-1]} instead."
        )
    training_args.resume_from_checkpoint = complete[-1]


# ---------------------------------------------------------------------------------------------------- set-up checks
def _restore_on_indexed_cpu(storage, location: str):
    return storage if location.startswith("cpu:") else None


def allow_loading_on_indexed_cpu() -> None:
    """Lets ``torch.load(..., map_location=torch.device("cpu", 0))`` work, for resuming DDP runs on CPU.

    With more than one process the Trainer loads the optimizer state with ``map_location=args.device``, which on CPU
    is ``cpu:0``; torch only knows the location ``cpu`` and fails with "don't know how to restore data location of
    torch.storage.UntypedStorage (tagged with cpu:0)", so no multi-process CPU run could resume. CPU storages need no
    move: the location is accepted as it is. (GPU runs load onto ``cuda:N`` and never reach this.)
    """
    import torch.serialization

    if getattr(allow_loading_on_indexed_cpu, "_registered", False):
        return
    torch.serialization.register_package(30, lambda storage: None, _restore_on_indexed_cpu)
    allow_loading_on_indexed_cpu._registered = True


def check_distributed_setup(model_args, finetuning_args, training_args) -> None:
    """Refuses what BlockLLM cannot serve across processes and sets what it needs; errors name the argument.

    Also checks the checkpoint a run would resume from (see :func:`check_resume_checkpoint`).
    """
    from llamafactory.extras import logging

    if getattr(finetuning_args, "stage", None) != "rm":  # LLaMA-Factory never resumes reward models (value head)
        check_resume_checkpoint(training_args, logging.get_logger(__name__))
    if getattr(training_args, "fsdp", None):
        raise ValueError(
            "`fsdp` cannot be combined with `finetuning_type: blockllm` (supported engines: DDP and DeepSpeed "
            "ZeRO-1/2/3); remove `fsdp`."
        )
    # The default, `head`, falls back to whole tensors there (see patches/optimizer.py); a number is refused.
    if training_args.deepspeed and getattr(finetuning_args, "blockllm_block_size", 0) not in (0, "head"):
        raise ValueError(
            f"`blockllm_block_size: {finetuning_args.blockllm_block_size}` cannot be combined with `deepspeed` (the "
            "ZeRO adapter selects whole tensors); set `blockllm_block_size: 0`, or train without `deepspeed`."
        )
    if training_args.deepspeed:
        check_deepspeed_config(_deepspeed_config(training_args))
        leave_clipping_to_blockllm(training_args)
        connect_deepspeed_comm()
        return
    if training_args.world_size <= 1:
        return
    allow_loading_on_indexed_cpu()
    if training_args.ddp_find_unused_parameters is False:
        raise ValueError(
            "`ddp_find_unused_parameters: false` cannot be combined with `finetuning_type: blockllm` under DDP: the "
            "parameters that produce gradients change with BlockLLM's selection; remove it (it is set to true)."
        )
    if training_args.ddp_static_graph:
        raise ValueError(
            "`ddp_static_graph: true` cannot be combined with `finetuning_type: blockllm`: the set of parameters "
            "that produce gradients changes with BlockLLM's selection; remove it."
        )
    training_args.ddp_find_unused_parameters = True
    if not model_args.disable_gradient_checkpointing and model_args.use_reentrant_gc:
        model_args.use_reentrant_gc = False
        logging.get_logger(__name__).info_rank0(
            "BlockLLM under DDP: `use_reentrant_gc` set to false (reentrant checkpointing hides parameters from "
            "DDP's search for unused ones)."
        )


# ---------------------------------------------------------------------------------------------------- optimizer class
def uses_deepspeed_zero(training_args) -> bool:
    return bool(getattr(training_args, "deepspeed", None))


def blockllm_optimizer_class(training_args):
    """BlockLLM, or under DeepSpeed ZeRO the variant that DeepSpeed can wrap (see blockllm_factory/optim/zero.py)."""
    if uses_deepspeed_zero(training_args):
        import functools

        from blockllm_factory.optim.zero import ZeroBlockLLM

        # The optimizer clips over the selected blocks itself; DeepSpeed's clipping is off (see use_own_clipping).
        return functools.partial(ZeroBlockLLM, max_grad_norm=float(training_args.max_grad_norm or 0.0))
    from blockllm_factory.optim import BlockLLM

    return BlockLLM


# ---------------------------------------------------------------------------------------------------- trainer side
RANK_DUMP_ENV = "BLOCKLLM_FACTORY_RANK_DUMP"


def attach_engine(trainer, optimizer, feed, logger) -> None:
    """Connects BlockLLM to the engine the trainer runs on; called once per optimizer by ``trainer.attach``.

    * DeepSpeed steps inside ``accelerator.backward``, before the trainer's callbacks run, so the loss feed moves into
      backward: the step's loss is recorded before DeepSpeed calls the optimizer.
    * DDP: probed blocks are measured on the averaged gradients (a communication hook, registered at train begin).
    * fp16 loss scaling (GradScaler): probed gradients are measured scaled, so BlockLLM divides by the scale; a step
      the scaler (or DeepSpeed's overflow check) skipped is reported to BlockLLM, which keeps states and selection.
    * ``BLOCKLLM_FACTORY_RANK_DUMP=DIR``: every rank writes its selection record and weights to ``DIR/rank<N>.pt`` at
      the end of training, to check that ranks agree.
    """
    accelerator = trainer.accelerator
    if uses_deepspeed_zero(trainer.args) and not getattr(accelerator, "_blockllm_feeds_in_backward", False):
        _feed_before_deepspeed_step(trainer, feed)
    elif accelerator.scaler is not None:
        optimizer.probe_grad_scale = accelerator.scaler.get_scale
    previous = getattr(trainer, "_blockllm_engine_callback", None)
    if previous is not None:
        trainer.remove_callback(previous)
    callback = _build_engine_callback(trainer, optimizer, logger)
    trainer.add_callback(callback)
    trainer._blockllm_engine_callback = callback


def _feed_before_deepspeed_step(trainer, feed) -> None:
    accelerator = trainer.accelerator
    # The trainer patch feeds the loss after training_step returns, which under DeepSpeed is after the step.
    trainer.training_step = getattr(trainer, "_blockllm_original_training_step", trainer.training_step)
    backward = accelerator.backward

    def backward_feeding_blockllm(loss, **kwargs):
        feed.add(loss)  # the same (accumulation-scaled) loss training_step returns
        if accelerator.sync_gradients:
            feed.flush()  # DeepSpeed's engine.step() runs inside this backward
        return backward(loss, **kwargs)

    backward_feeding_blockllm.__wrapped__ = backward
    accelerator.backward = backward_feeding_blockllm
    accelerator._blockllm_feeds_in_backward = True


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

        def on_train_end(self, args, state, control, **kwargs):
            import os

            directory = os.environ.get(RANK_DUMP_ENV)
            if directory:
                dump_rank_state(trainer, optimizer, directory)

    return BlockLLMEngineCallback()


def dump_rank_state(trainer, optimizer, directory: str) -> str:
    """Writes this rank's selection record and full weights (gathered under ZeRO-3) to ``directory/rank<N>.pt``."""
    import contextlib
    import os

    import torch

    model = trainer.model
    params = list(model.named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(param, "ds_numel") for _, param in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=None)
    with gather:
        weights = {name: param.detach().to("cpu", torch.float32, copy=True) for name, param in params}
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "events": [dict(event) for event in optimizer.selection_events],
        "norms": optimizer.norm_table,
        "visits": optimizer.visit_counts,
        "selection": optimizer.selection,
        "skipped_steps": optimizer.skipped_steps,
        "weights": weights,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{trainer.args.process_index}.pt")
    torch.save(record, path)
    return path

"""Surface ``llamafactory.hparams.parser``: training set-ups that BlockLLM cannot serve, decided at parse time.

``FinetuningArguments.__post_init__`` (see :mod:`.arguments`) cannot see the training arguments. ``get_train_args``
calls the module-level ``_check_extra_dependencies(model_args, finetuning_args, training_args)`` after its own checks
and before anything is loaded, so a wrapper of that function is the earliest place that sees all three.
``get_ray_args`` is wrapped to refuse ``USE_RAY=1`` before LLaMA-Factory starts Ray.

``get_train_args`` is wrapped too, for one rule of full tuning that it applies by comparing the type with "full":
a reward model (stage rm) cannot resume from a checkpoint, because the value-head checkpoint layout does not load
back into the model (the weights would silently stay at their initial values).
"""

import functools

from blockllm_factory.optim.settings import FINETUNING_TYPE

from ._version import check_llamafactory_version
from .launch import ray_refusal, requested_finetuning_type

NO_RESUME_STAGES = ("rm", "ppo")  # as LLaMA-Factory does for full and freeze tuning


def check_training_setup(model_args, finetuning_args, training_args) -> None:
    """Errors name the argument to change and why; warnings go to LLaMA-Factory's log."""
    # Launchers and loaders that would train on another engine (MCA, accelerate's FSDP, Ray, unsloth): launch.py.
    from .launch import check_launch

    check_launch(model_args, finetuning_args, training_args)
    # The optimizer's settings from the training arguments, checked as the Trainer front checks them.
    from blockllm_factory.hf.engine import check_optim, check_optimizer_values

    check_optim(training_args)
    check_optimizer_values(training_args)
    from llamafactory.extras import logging

    from ._surfaces import PARSER

    # Named as the patched module: LLaMA-Factory sets its handler and level on its own `llamafactory` logger only, so
    # a logger named after this file would drop its info lines.
    logger = logging.get_logger(PARSER)
    # A checkpoint whose save was interrupted, or that cannot resume exactly, is never resumed from: checkpoints.py.
    if getattr(finetuning_args, "stage", None) != "rm":  # LLaMA-Factory never resumes reward models (value head)
        from .checkpoints import check_resume_checkpoint

        check_resume_checkpoint(training_args, logger, finetuning_args)
    warn_lost_runs(training_args, logger)
    # Multi-process engines (DDP, DeepSpeed) have their own checks and settings: engine_setup.py.
    from .engine_setup import check_distributed_setup

    check_distributed_setup(model_args, finetuning_args, training_args)
    deepspeed_config = None
    if training_args.deepspeed:
        from blockllm_factory.hf.deepspeed_config import read_deepspeed_config

        from ._surfaces import check_deepspeed_surfaces

        check_deepspeed_surfaces()
        deepspeed_config = read_deepspeed_config(training_args)
    # Defaults that would silently cost the run, read from the model's files: model_checks.py.
    from .model_checks import check_model_setup

    check_model_setup(model_args, finetuning_args, training_args, deepspeed_config, logger)


def warn_lost_runs(training_args, logger) -> None:
    """Set-ups that run to the end but leave the user without something they would expect: warned at parse time."""
    if getattr(training_args, "do_train", True) and getattr(training_args, "max_steps", -1) == 1:
        logger.warning_rank0(
            "`max_steps: 1` with `finetuning_type: blockllm` trains nothing: BlockLLM's first optimizer step only "
            "measures every block's gradient to make its first selection, and updates start with the second step; "
            "set `max_steps` to at least 2."
        )
    if getattr(training_args, "save_only_model", False):
        logger.warning_rank0(
            "`save_only_model: true` with `finetuning_type: blockllm`: its checkpoints hold no optimizer state (the "
            "selection, Adam moments, learning-rate schedule), so training cannot resume from them; remove it to keep "
            "checkpoints resumable."
        )


def build_check_extra_dependencies(original):
    @functools.wraps(original)
    def _check_extra_dependencies(model_args, finetuning_args, training_args=None):
        if training_args is not None and finetuning_args.finetuning_type == FINETUNING_TYPE:
            check_training_setup(model_args, finetuning_args, training_args)
        return original(model_args, finetuning_args, training_args)

    return _check_extra_dependencies


def build_get_train_args(original, logger):
    @functools.wraps(original)
    def get_train_args(args=None):
        model_args, data_args, training_args, finetuning_args, generating_args = original(args)
        if (
            finetuning_args.finetuning_type == FINETUNING_TYPE
            and finetuning_args.stage in NO_RESUME_STAGES
            and training_args.resume_from_checkpoint is not None
        ):
            logger.warning_rank0("Cannot resume from checkpoint in current stage.")
            training_args.resume_from_checkpoint = None
        return model_args, data_args, training_args, finetuning_args, generating_args

    return get_train_args


def build_get_ray_args(original, read_args):
    """Ray is refused before LLaMA-Factory starts it (each Ray worker would refuse it again when parsing)."""

    @functools.wraps(original)
    def get_ray_args(args=None):
        ray_args = original(args)
        if getattr(ray_args, "use_ray", False) and requested_finetuning_type(read_args(args)) == FINETUNING_TYPE:
            raise ValueError(ray_refusal())
        return ray_args

    return get_ray_args


def apply(module) -> None:
    check_llamafactory_version()
    check_extra_dependencies = build_check_extra_dependencies(module._check_extra_dependencies)
    get_train_args = build_get_train_args(module.get_train_args, module.logger)
    get_ray_args = build_get_ray_args(module.get_ray_args, module.read_args)
    module._check_extra_dependencies = check_extra_dependencies
    module.get_train_args = get_train_args
    module.get_ray_args = get_ray_args

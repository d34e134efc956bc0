"""Surface ``llamafactory.train.trainer_utils``: the custom-optimizer factory builds BlockLLM.

Every stage trainer of LLaMA-Factory (pt, sft, rm, dpo, kto) creates its optimizer with
``create_custom_optimizer(model, training_args, finetuning_args)``, imported from this module by name; the patch runs
before those imports, so they all get the wrapped factory. ``_create_blockllm_optimizer`` builds BlockLLM with the
builder both fronts share (:func:`blockllm_factory.hf.optimizer.build_optimizer`), with LLaMA-Factory's own
``_get_decay_parameter_names`` deciding which parameters get weight decay, and the run's optimizer steps (for a
``blockllm_patience`` in (0, 1)) passed in by the trainer patch through :func:`run_steps`.
"""

import contextlib
import contextvars
import functools

from blockllm_factory.optim.settings import FINETUNING_TYPE

from ._version import check_llamafactory_version

# The run's optimizer steps, set by the trainer patch (trainer.py) around ``create_optimizer``: the Trainer knows them
# (``state.max_steps``, from max_steps or from epochs x batches) before it creates the optimizer; the factory
# LLaMA-Factory calls is not told them.
_RUN_STEPS: contextvars.ContextVar[int | None] = contextvars.ContextVar("blockllm_run_steps", default=None)


@contextlib.contextmanager
def run_steps(total_steps: int | None):
    """Within this block, BlockLLM optimizers are created for a run of ``total_steps`` optimizer steps."""
    token = _RUN_STEPS.set(total_steps if isinstance(total_steps, int) and total_steps > 0 else None)
    try:
        yield
    finally:
        _RUN_STEPS.reset(token)


def build_create_blockllm_optimizer(module):
    get_decay_parameter_names = module._get_decay_parameter_names
    logger = module.logger

    def _create_blockllm_optimizer(model, training_args, finetuning_args):
        from blockllm_factory.hf.optimizer import build_optimizer

        decay_names = set(get_decay_parameter_names(model))
        return build_optimizer(model, training_args, finetuning_args, decay_names, logger, _RUN_STEPS.get())

    return _create_blockllm_optimizer


def build_create_custom_optimizer(original, create_blockllm_optimizer):
    @functools.wraps(original)
    def create_custom_optimizer(model, training_args, finetuning_args):
        if finetuning_args.finetuning_type == FINETUNING_TYPE:
            return create_blockllm_optimizer(model, training_args, finetuning_args)
        return original(model, training_args, finetuning_args)

    return create_custom_optimizer


def apply(module) -> None:
    check_llamafactory_version()
    create_blockllm_optimizer = build_create_blockllm_optimizer(module)
    wrapped = build_create_custom_optimizer(module.create_custom_optimizer, create_blockllm_optimizer)
    module._create_blockllm_optimizer = create_blockllm_optimizer
    module.create_custom_optimizer = wrapped

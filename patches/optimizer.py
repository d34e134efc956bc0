"""Surface ``llamafactory.train.trainer_utils``: the custom-optimizer factory builds BlockLLM.

Every stage trainer of LLaMA-Factory (pt, sft, rm, dpo, kto) creates its optimizer with
``create_custom_optimizer(model, training_args, finetuning_args)``, imported from this module by name; the patch runs
before those imports, so they all get the wrapped factory. Like LLaMA-Factory's ``_create_*_optimizer`` functions,
``_create_blockllm_optimizer`` takes lr, betas, eps and weight decay from the training arguments, and puts biases and
norm weights in a group without weight decay (LLaMA-Factory's own ``_get_decay_parameter_names``). HF schedulers then
drive ``param_groups[i]["lr"]`` as for any torch optimizer. Two YAML-only values become numbers here:
``blockllm_block_size: head`` (from the model's config) and a ``blockllm_patience`` in (0, 1) (that share of the run's
optimizer steps, which the trainer patch passes in through :func:`run_steps`).
"""

import contextlib
import contextvars
import functools

from blockllm_factory.optim.settings import BLOCK_SIZE_HEAD, FINETUNING_TYPE, steps_from_share

from ._version import check_llamafactory_version


def _text_config(model):
    """The language model's config: ``text_config`` of a vision-language model; through trl's value-head wrapper of
    reward models."""
    config = getattr(model, "config", None) or getattr(getattr(model, "pretrained_model", None), "config", None)
    return getattr(config, "text_config", None) or config


def head_block_size(model) -> int | None:
    """Coordinates of one attention head of q/k/v: ``head_dim x hidden_size`` from the model's config (``None``
    when the config does not say)."""
    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return head_dim * hidden if isinstance(hidden, int) and isinstance(head_dim, int) and head_dim > 0 else None


def resolve_block_size(block_size, model, deepspeed_zero: bool, logger) -> int:
    """``blockllm_block_size`` as a number: ``head`` becomes one attention head's coordinates, or whole tensors (0)
    under DeepSpeed (whose adapter selects whole tensors) and for a model whose config names no heads."""
    if block_size != BLOCK_SIZE_HEAD:
        return block_size
    if deepspeed_zero:
        logger.info_rank0("BlockLLM under DeepSpeed selects whole tensors (`blockllm_block_size: head` -> 0).")
        return 0
    size = head_block_size(model)
    if size is None:
        logger.warning_rank0(
            "`blockllm_block_size: head`: the model's config has no hidden_size / num_attention_heads, so BlockLLM "
            "selects whole tensors; set `blockllm_block_size` to a number of coordinates to use row groups."
        )
        return 0
    return size


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


def resolve_patience(patience, training_args, logger) -> int:
    """``blockllm_patience`` as optimizer steps: an integer stays; a share in (0, 1) becomes that share of the run's
    steps (the Trainer's, else ``max_steps``), logged once; refused when the run's length is unknown."""
    if isinstance(patience, int):
        return patience
    total_steps = _RUN_STEPS.get()
    if total_steps is None and getattr(training_args, "max_steps", -1) > 0:
        total_steps = training_args.max_steps
    if total_steps is None:
        raise ValueError(
            f"`blockllm_patience: {patience}` is a share of the run, but the run's number of optimizer steps is not "
            "known where the optimizer is created; set `max_steps`, or give `blockllm_patience` as a number of "
            "optimizer steps (an integer >= 1)."
        )
    steps = steps_from_share(patience, total_steps)
    logger.info_rank0(
        f"BlockLLM patience: `blockllm_patience: {patience}` of {total_steps:,} optimizer steps is {steps} steps."
    )
    return steps


def build_create_blockllm_optimizer(module):
    get_decay_parameter_names = module._get_decay_parameter_names
    logger = module.logger

    def _create_blockllm_optimizer(model, training_args, finetuning_args):
        decay_names = set(get_decay_parameter_names(model))
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:  # frozen by LLaMA-Factory (e.g. a vision tower): never trained
                (decay if name in decay_names else no_decay).append((name, param))

        param_groups = [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": training_args.weight_decay},
        ]
        # DeepSpeed ZeRO wraps a variant that works on its partitions (see engine.py, optim/zero.py).
        from .engine import blockllm_optimizer_class, uses_deepspeed_zero
        from .precision import compact_gradients, optim_bits

        deepspeed_zero = uses_deepspeed_zero(training_args)
        block_size = resolve_block_size(finetuning_args.blockllm_block_size, model, deepspeed_zero, logger)
        patience = resolve_patience(finetuning_args.blockllm_patience, training_args, logger)
        optimizer = blockllm_optimizer_class(training_args)(
            [group for group in param_groups if group["params"]],
            lr=training_args.learning_rate,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
            eps=training_args.adam_epsilon,
            weight_decay=training_args.weight_decay,
            sparsity=finetuning_args.blockllm_sparsity,
            patience=patience,
            probe=finetuning_args.blockllm_probe,
            probe_blocks=finetuning_args.blockllm_probe_blocks,
            include_embeddings=finetuning_args.blockllm_include_embeddings,
            seed=training_args.seed,
            optim_bits=optim_bits(training_args),
            score=finetuning_args.blockllm_score,
            block_size=block_size,
            norms=finetuning_args.blockllm_norms,
            **({} if deepspeed_zero else {"master": finetuning_args.blockllm_master}),
            **({} if deepspeed_zero else {"compact_gradients": compact_gradients(training_args)}),
        )
        blocks = f"{block_size:,} coordinates" if block_size else "whole tensors"
        blocks += f" (`blockllm_block_size: {finetuning_args.blockllm_block_size}`)"
        probed = (
            f" ({finetuning_args.blockllm_probe_blocks} blocks)" if finetuning_args.blockllm_probe == "sample" else ""
        )
        logger.info_rank0(
            f"Using BlockLLM optimizer: sparsity {finetuning_args.blockllm_sparsity}, patience {patience}, probe "
            f"{finetuning_args.blockllm_probe}{probed}, score "
            f"{finetuning_args.blockllm_score}, blocks of {blocks}, norms {finetuning_args.blockllm_norms}, "
            f"budget {optimizer.budget:,} of "
            f"{optimizer.eligible_numel:,} coordinates per step; "
            f"{'compact' if optimizer.compact_gradients else 'dense'} gradients, {optimizer.optim_bits}-bit moments, "
            f"{optimizer.master} masters (for half-precision weights)."
        )
        return optimizer

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

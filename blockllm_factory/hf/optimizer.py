"""Building BlockLLM for a transformers ``Trainer`` from its training arguments and the ``blockllm_*`` settings.

Shared by both fronts: LLaMA-Factory's optimizer factory (``patches/optimizer.py``) and the Trainer front
(:mod:`.trainer`). Like LLaMA-Factory's ``_create_*_optimizer`` functions and the Trainer's own ``create_optimizer``,
lr, betas, eps and weight decay come from the training arguments, and the parameters the caller names as not decayed
(biases and norm weights) go in a group without weight decay. Every parameter that requires grad is handed over,
although BlockLLM freezes most of them at its first step; HF schedulers then drive ``param_groups[i]["lr"]`` as for
any torch optimizer. YAML-only values become numbers here: ``blockllm_block_size: head`` (from the model's config),
``blockllm_coverage: auto`` (from the block size), ``blockllm_include_embeddings: auto`` (from the engine, the block
size and the model's embedding modules) and a ``blockllm_patience`` or ``blockllm_reselect_until`` in (0, 1)
(that share of the run's optimizer steps, which the Trainer knows).
"""

from blockllm_factory.optim.rows import attach_row_gradients, rows_serve_embeddings
from blockllm_factory.optim.selection import is_embedding_name
from blockllm_factory.optim.settings import (
    BLOCK_SIZE_HEAD,
    COVERAGE_AUTO,
    COVERAGE_ROW_GROUPS,
    EMBEDDINGS_AUTO,
    SETTINGS,
    YAML_SETTINGS,
    steps_from_share,
)

from .engine import SINGLE, blockllm_optimizer_class, engine_of, optim_bits


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


def resolve_coverage(coverage, block_size: int) -> float:
    """``blockllm_coverage`` as a number: ``auto`` is COVERAGE_ROW_GROUPS (4) with row-group blocks (``block_size``
    > 0, as resolved) and 1 (the paper) with whole tensors: coverage 4 was measured better with head blocks only,
    and under DeepSpeed (whole tensors) the partitions would hold four budgets' worth of picked tensors whole."""
    if coverage != COVERAGE_AUTO:
        return coverage
    return COVERAGE_ROW_GROUPS if block_size else 1.0


def embeddings_engine(decided, block_size) -> bool:
    """The part of ``blockllm_include_embeddings: auto`` known before the model loads: one process and row-group
    blocks (``block_size``: the YAML value, ``head`` or N, or the resolved number; 0 means whole tensors). The
    parse-time checks (patches/model_checks.py) and :func:`resolve_include_embeddings` share it."""
    return decided.kind == SINGLE and block_size != 0


def resolve_include_embeddings(include_embeddings, model, decided, block_size: int) -> bool:
    """``auto`` (the YAML default): the embeddings and the head join the blocks where their gradients can be kept as
    rows (optim/rows.py): one process, row-group blocks (``block_size`` > 0), and only plain ``nn.Embedding`` /
    ``nn.Linear`` modules hold them. Elsewhere autograd would hand BlockLLM their whole gradient (vocab x hidden, and
    twice over when tied: docs/memory.md), so they stay frozen, as in the paper's code. True or false: as given."""
    if include_embeddings != EMBEDDINGS_AUTO:
        return include_embeddings
    return embeddings_engine(decided, block_size) and rows_serve_embeddings(model, is_embedding_name)


def resolve_steps(name: str, value, training_args, logger, total_steps: int | None = None) -> int:
    """A setting that also takes a share of the run (``blockllm_patience``, ``blockllm_reselect_until``) as optimizer
    steps: an integer stays; a share in (0, 1) becomes that share of the run's steps (``total_steps``, the Trainer's,
    else ``max_steps``), logged once; refused when the run's length is unknown."""
    if isinstance(value, int):
        return value
    field = SETTINGS[name].field
    if not (isinstance(total_steps, int) and total_steps > 0):
        total_steps = training_args.max_steps if getattr(training_args, "max_steps", -1) > 0 else None
    if total_steps is None:
        raise ValueError(
            f"`{field}: {value}` is a share of the run, but the run's number of optimizer steps is not known where "
            f"the optimizer is created; set `max_steps`, or give `{field}` as {SETTINGS[name].allowed}."
        )
    steps = steps_from_share(value, total_steps)
    logger.info_rank0(f"BlockLLM {name}: `{field}: {value}` of {total_steps:,} optimizer steps is {steps} steps.")
    return steps


def build_optimizer(model, training_args, settings, decay_names, logger, total_steps: int | None = None):
    """BlockLLM (or, under DeepSpeed ZeRO, ZeroBlockLLM) over ``model``'s parameters that require grad.

    ``settings``: any object with the ``blockllm_*`` fields (LLaMA-Factory's ``FinetuningArguments``, the Trainer
    front's ``BlockLLMConfig``), already checked; ``decay_names``: the parameter names that get weight decay;
    ``total_steps``: the run's optimizer steps where known (for a patience given as a share of the run)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:  # frozen by the caller (e.g. a vision tower): never trained
            (decay if name in decay_names else no_decay).append((name, param))
    param_groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": training_args.weight_decay},
    ]
    # DeepSpeed ZeRO wraps a variant that works on its partitions (see engine.py, optim/zero.py).
    decided = engine_of(training_args)
    block_size = resolve_block_size(settings.blockllm_block_size, model, decided.deepspeed, logger)
    coverage = resolve_coverage(settings.blockllm_coverage, block_size)
    include_embeddings = resolve_include_embeddings(settings.blockllm_include_embeddings, model, decided, block_size)
    patience = resolve_steps("patience", settings.blockllm_patience, training_args, logger, total_steps)
    reselect_until = resolve_steps(
        "reselect_until", settings.blockllm_reselect_until, training_args, logger, total_steps
    )
    # Every YAML setting flows through by name from the settings table; five are resolved above.
    blockllm_settings = {setting.name: getattr(settings, setting.field) for setting in YAML_SETTINGS}
    blockllm_settings.update(
        block_size=block_size,
        coverage=coverage,
        include_embeddings=include_embeddings,
        patience=patience,
        reselect_until=reselect_until,
    )
    optimizer = blockllm_optimizer_class(training_args)(
        [group for group in param_groups if group["params"]],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
        seed=training_args.seed,
        optim_bits=optim_bits(training_args),
        **blockllm_settings,
        compact_gradients=decided.compact_gradients,
    )
    # Embedding and head weights among the blocks: their gradients as rows, never whole (optim/rows.py).
    routed = attach_row_gradients(optimizer, model)
    blocks = f"{block_size:,} coordinates" if block_size else "whole tensors"
    blocks += f" (`blockllm_block_size: {settings.blockllm_block_size}`)"
    covered = f"{coverage:g}"
    if settings.blockllm_coverage == COVERAGE_AUTO:
        covered += f" (`blockllm_coverage: {COVERAGE_AUTO}`)"
    embeddings = "as row blocks" if include_embeddings else "frozen"
    if settings.blockllm_include_embeddings == EMBEDDINGS_AUTO:
        embeddings += f" (`blockllm_include_embeddings: {EMBEDDINGS_AUTO}`)"
    probed = f" ({settings.blockllm_probe_blocks} blocks)" if settings.blockllm_probe == "sample" else ""
    reselections = f"until step {reselect_until}" if reselect_until else "whenever the loss rule fires"
    if reselect_until and settings.blockllm_probe == "exact":  # the exact probe reselects one step after the rule
        reselections += (
            f" (the exact probe's: a rule fired at step {reselect_until} reselects at {reselect_until + 1})"
        )
    logger.info_rank0(
        f"Using BlockLLM optimizer: sparsity {settings.blockllm_sparsity}, patience {patience}, probe "
        f"{settings.blockllm_probe}{probed}, score "
        f"{settings.blockllm_score}, blocks of {blocks}, coverage {covered}, keep {settings.blockllm_keep}, "
        f"embeddings and head {embeddings}, "
        f"reselections {reselections}, "
        f"warm-up after reselection {settings.blockllm_reselect_warmup} steps, norms "
        f"{settings.blockllm_norms}, "
        f"budget {optimizer.budget:,} of "
        f"{optimizer.eligible_numel:,} coordinates per step; "
        f"{'compact' if optimizer.compact_gradients else 'dense'} gradients"
        f"{' (as rows for ' + ', '.join(routed) + ')' if routed else ''}, {optimizer.optim_bits}-bit moments, "
        f"{optimizer.master} masters (for half-precision weights); engine: {decided.describe()}."
    )
    return optimizer

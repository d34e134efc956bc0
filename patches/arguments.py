"""Surface ``llamafactory.hparams.finetuning_args``: ``finetuning_type: blockllm`` and the ``blockllm_*`` arguments.

Right after the module executes (before ``hparams/__init__`` and ``parser.py`` import the name), its
``FinetuningArguments`` is replaced by a dataclass subclass that adds the ``blockllm_*`` fields (with help text, so
LLaMA-Factory's own ``HfArgumentParser`` parses them from YAML, JSON or the command line) and accepts ``blockllm`` as
``finetuning_type``. Every check runs in ``__post_init__``, i.e. while the arguments are parsed, before a model loads.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ._version import check_llamafactory_version

FINETUNING_TYPE = "blockllm"
STAGES = ("pt", "sft", "rm", "dpo", "kto")
PROBES = ("sample", "exact")
SCORES = ("norm", "norm_per_sqrt_size")
BLOCK_SIZE_HEAD = "head"  # blockllm_block_size resolved from the model's config (patches/optimizer.py)

# Other optimizers and methods LLaMA-Factory switches on by flag; BlockLLM is itself the optimizer.
EXCLUSIVE_FLAGS = (
    "use_galore",
    "use_apollo",
    "use_badam",
    "use_adam_mini",
    "use_muon",
    "use_llama_pro",
    "use_hyper_parallel",
)
# Dataclasses of LLaMA-Factory whose fields only adapter (LoRA/OFT) or freeze tuning read.
ADAPTER_ONLY_DATACLASSES = ("LoraArguments", "OFTArguments", "FreezeArguments")


@dataclass
class BlockLLMArguments:
    r"""Arguments pertaining to BlockLLM (arXiv 2406.17296), used with ``finetuning_type: blockllm``."""

    blockllm_sparsity: float = field(
        default=0.95,
        metadata={
            "help": (
                "Share of the trainable coordinates that BlockLLM leaves unchanged at each step, in [0, 1). "
                "0.95 (the paper's setting) updates about one coordinate in twenty at a time."
            )
        },
    )
    blockllm_patience: int = field(
        default=100,
        metadata={
            "help": (
                "Window m of BlockLLM's loss rule (>= 1): the selected blocks are revisited when the loss is at or "
                "above the mean of the last m optimizer-step losses."
            )
        },
    )
    blockllm_probe: Literal["sample", "exact"] = field(
        default="sample",
        metadata={
            "help": (
                "How BlockLLM measures gradient norms of unselected blocks: `sample` (the paper: a few random "
                "unselected blocks per step) or `exact` (every block, one gradient at a time, before a reselection)."
            )
        },
    )
    blockllm_probe_blocks: int = field(
        default=2,
        metadata={"help": "Number of unselected blocks probed per step with `blockllm_probe: sample` (>= 0)."},
    )
    blockllm_include_embeddings: bool = field(
        default=False,
        metadata={
            "help": (
                "Whether BlockLLM may also select the input embeddings and the output head "
                "(needed when training from scratch). Off by default, as in the paper's code."
            )
        },
    )
    blockllm_score: Literal["norm", "norm_per_sqrt_size"] = field(
        default="norm_per_sqrt_size",
        metadata={
            "help": (
                "How BlockLLM ranks blocks: `norm_per_sqrt_size` (the default: gradient norm over visit frequency, "
                "divided by the square root of the block's size, which removes the bias toward large tensors; "
                "measured better, docs/algorithm.md) or `norm` (the paper's rule)."
            )
        },
    )
    blockllm_block_size: str = field(
        default=BLOCK_SIZE_HEAD,
        metadata={
            "help": (
                "Size of BlockLLM's blocks: `head` (the default: groups of whole rows of head_dim x hidden_size "
                "coordinates, one attention head of q/k/v, read from the model's config; whole tensors under "
                "DeepSpeed), an integer N > 0 (row groups of about N coordinates) or 0 (the paper: every weight "
                "tensor is one block). Finer blocks spread the budget over more layers. Numbers other than 0 are "
                "refused under DeepSpeed."
            )
        },
    )


def check_blockllm_values(args: BlockLLMArguments) -> None:
    """Range checks of the ``blockllm_*`` fields; errors name the field and its allowed values."""
    sparsity = args.blockllm_sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"`blockllm_sparsity` must be a number in [0, 1) (the share of coordinates left unchanged per step), "
            f"got {sparsity!r}."
        )
    patience = args.blockllm_patience
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"`blockllm_patience` must be an integer >= 1 (optimizer steps), got {patience!r}.")
    if args.blockllm_probe not in PROBES:
        raise ValueError(f"`blockllm_probe` must be one of {', '.join(PROBES)}, got {args.blockllm_probe!r}.")
    probe_blocks = args.blockllm_probe_blocks
    if isinstance(probe_blocks, bool) or not isinstance(probe_blocks, int) or probe_blocks < 0:
        raise ValueError(f"`blockllm_probe_blocks` must be an integer >= 0, got {probe_blocks!r}.")
    if not isinstance(args.blockllm_include_embeddings, bool):
        raise ValueError(
            f"`blockllm_include_embeddings` must be true or false, got {args.blockllm_include_embeddings!r}."
        )
    if args.blockllm_score not in SCORES:
        raise ValueError(f"`blockllm_score` must be one of {', '.join(SCORES)}, got {args.blockllm_score!r}.")
    block_size = args.blockllm_block_size
    if isinstance(block_size, str) and block_size.strip().isdigit():  # from the command line or the web UI
        block_size = args.blockllm_block_size = int(block_size)
    if block_size != BLOCK_SIZE_HEAD and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0
    ):
        raise ValueError(
            f"`blockllm_block_size` must be `{BLOCK_SIZE_HEAD}` (one attention head: head_dim x hidden_size "
            f"coordinates, the default), an integer > 0 (row groups of about that many coordinates) or 0 (whole "
            f"tensors, the paper), got {block_size!r}."
        )


def _adapter_only_defaults(module) -> dict[str, object]:
    defaults = {}
    for class_name in ADAPTER_ONLY_DATACLASSES:
        for spec in dataclasses.fields(getattr(module, class_name)):
            if spec.default is not dataclasses.MISSING:
                defaults[spec.name] = spec.default
    return defaults


def check_fully_patched() -> None:
    """Never train ``blockllm`` on a half-patched LLaMA-Factory: the first patch that failed is named."""
    from blockllm_factory import _import_hook

    if _import_hook.failures:
        module, reason = next(iter(_import_hook.failures.items()))
        raise RuntimeError(
            f"`finetuning_type: blockllm` is unavailable: blockllm-factory could not patch {module} ({reason})."
        )


def check_blockllm_combination(args, adapter_only_defaults: dict[str, object]) -> None:
    """Refuses what cannot go with ``finetuning_type: blockllm``, naming the offending argument."""
    check_fully_patched()
    if args.stage == "ppo":
        from ._version import installed_version

        raise ValueError(
            "`stage: ppo` cannot be combined with `finetuning_type: blockllm`: LLaMA-Factory's PPO trainer requires "
            "trl<=0.9.6 and the transformers 4 tokenizer API, while its other stages require the installed trl "
            f"{installed_version('trl')} and transformers {installed_version('transformers')}, so PPO does not run "
            "here with any fine-tuning method; for preference tuning use `stage: dpo` or `stage: kto`."
        )
    if args.stage not in STAGES:
        raise ValueError(
            f"`finetuning_type: blockllm` supports `stage` {', '.join(STAGES)}; got `stage: {args.stage}`."
        )
    for flag in EXCLUSIVE_FLAGS:
        if getattr(args, flag):
            raise ValueError(
                f"`{flag}` cannot be combined with `finetuning_type: blockllm` (BlockLLM is itself the optimizer and "
                "trains the plain model); remove it."
            )
    changed = [
        f"{name}={getattr(args, name)!r}"
        for name, default in adapter_only_defaults.items()
        if getattr(args, name) != default
    ]
    if changed:
        raise ValueError(
            "`finetuning_type: blockllm` trains the plain model, so these LoRA/OFT/freeze-only arguments would be "
            f"ignored; remove them: {', '.join(changed)}."
        )


def with_blockllm_type(original, post_init):
    """A dataclass subclass of ``original`` with the ``blockllm_*`` fields, ``blockllm`` among the allowed
    ``finetuning_type`` values, and ``post_init`` as its ``__post_init__``."""
    finetuning_spec = next(spec for spec in dataclasses.fields(original) if spec.name == "finetuning_type")
    allowed = tuple(getattr(finetuning_spec.type, "__args__", ())) + (FINETUNING_TYPE,)

    @dataclass
    class FinetuningArguments(BlockLLMArguments, original):
        finetuning_type: Literal[allowed] = field(  # type: ignore[valid-type]
            default=finetuning_spec.default,
            metadata={"help": "Which fine-tuning method to use (`blockllm`: the BlockLLM optimizer, full model)."},
        )

        __post_init__ = post_init

    FinetuningArguments.__module__ = original.__module__
    FinetuningArguments.__qualname__ = original.__qualname__
    FinetuningArguments.__doc__ = original.__doc__
    return FinetuningArguments


def build_finetuning_arguments(module):
    """A subclass of LLaMA-Factory's ``FinetuningArguments`` that knows ``blockllm``; nothing else changes."""
    original = module.FinetuningArguments
    adapter_only_defaults = _adapter_only_defaults(module)

    def __post_init__(self):
        check_blockllm_values(self)
        if self.finetuning_type != FINETUNING_TYPE:
            return original.__post_init__(self)

        check_blockllm_combination(self, adapter_only_defaults)
        # LLaMA-Factory's own checks assert the finetuning type; blockllm shares every rule of full tuning.
        self.finetuning_type = "full"
        try:
            original.__post_init__(self)
        finally:
            self.finetuning_type = FINETUNING_TYPE

    return with_blockllm_type(original, __post_init__)


def apply_refusal(module) -> None:
    """Called by the import hook when this module could not be patched: ``finetuning_type: blockllm`` (and the
    ``blockllm_*`` fields) still parse, and are refused with the failure, instead of LLaMA-Factory's own
    "Invalid fine-tuning method"; every other method behaves exactly as before."""
    original = module.FinetuningArguments

    def __post_init__(self):
        if self.finetuning_type == FINETUNING_TYPE:
            check_fully_patched()
        return original.__post_init__(self)

    module.FinetuningArguments = with_blockllm_type(original, __post_init__)


def apply(module) -> None:
    check_llamafactory_version()
    patched = build_finetuning_arguments(module)  # built fully before the module is touched
    module.BlockLLMArguments = BlockLLMArguments
    module.FinetuningArguments = patched

"""Surface ``llamafactory.hparams.finetuning_args``: ``finetuning_type: blockllm`` and the ``blockllm_*`` arguments.

Right after the module executes (before ``hparams/__init__`` and ``parser.py`` import the name), its
``FinetuningArguments`` is replaced by a dataclass subclass that adds the ``blockllm_*`` fields (with help text, so
LLaMA-Factory's own ``HfArgumentParser`` parses them from YAML, JSON or the command line) and accepts ``blockllm`` as
``finetuning_type``. Every check runs in ``__post_init__``, i.e. while the arguments are parsed, before a model loads.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from blockllm_factory.optim.settings import FINETUNING_TYPE, YAML_SETTINGS, BlockLLMArguments, check_arguments

from ._version import check_llamafactory_version

STAGES = ("pt", "sft", "rm", "dpo", "kto")

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


def check_blockllm_unused(args) -> None:
    """A ``blockllm_*`` field set with another ``finetuning_type`` would be ignored (LoRA, LLaMA-Factory's default, or
    full tuning would train instead): refused, naming the fields."""
    changed = [
        f"{setting.field}={getattr(args, setting.field)!r}"
        for setting in YAML_SETTINGS
        if getattr(args, setting.field) != setting.yaml_default
    ]
    if changed:
        raise ValueError(
            f"{', '.join(changed)} only apply with `finetuning_type: blockllm`; with `finetuning_type: "
            f"{args.finetuning_type}` they would be ignored; set `finetuning_type: blockllm`, or remove them."
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
        check_arguments(self)
        if self.finetuning_type != FINETUNING_TYPE:
            check_blockllm_unused(self)
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

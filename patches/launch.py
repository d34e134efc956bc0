"""Launchers and loaders that would run ``finetuning_type: blockllm`` on another engine without a word: refused at
parse time, from :func:`.parser.check_training_setup`, before any model is loaded.

* ``accelerate launch --config_file fsdp_config.yaml`` (LLaMA-Factory's documented FSDP launch) sets
  ``ACCELERATE_USE_FSDP=true`` and leaves the ``fsdp`` training argument empty: the Trainer's accelerator still wraps
  the model in FSDP, which BlockLLM does not serve (the ``fsdp`` argument itself is refused in ``engine_setup.py``).
* ``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_USE_DEEPSPEED=true``: without a ``deepspeed:``
  argument none of BlockLLM's DeepSpeed checks and settings see the config, and the plain optimizer would be handed
  to DeepSpeed's ZeRO partitions.
* ``USE_RAY=1``: LLaMA-Factory trains in Ray workers that it places and connects itself; BlockLLM was never run there.
* ``use_unsloth: true``: unsloth loads the model for adapter training (its ``full_finetuning`` is only on for
  ``finetuning_type: full``), and its patched kernels need a GPU; BlockLLM trains the plain model.
* Megatron backends (``USE_MCA=1``, and ``USE_MEGATRON_BRIDGE=1`` of LLaMA-Factory's main branch) train with their own
  loops and optimizers.
"""

import os

TRUE = "true"


def _accelerate_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == TRUE  # accelerate's own reading of its launch variables


def ray_refusal() -> str:
    return (
        "`USE_RAY=1` cannot be combined with `finetuning_type: blockllm` (BlockLLM runs in one process, under DDP or "
        "under DeepSpeed ZeRO); unset USE_RAY and launch with `FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli "
        "train` for several processes."
    )


def check_launch(model_args, finetuning_args, training_args) -> None:
    """Errors name the setting (environment variable or argument) and what to use instead."""
    from llamafactory.extras.misc import use_ray

    if getattr(finetuning_args, "use_mca", False):
        raise ValueError("`finetuning_type: blockllm` does not run on the MCA (Megatron) backend; unset USE_MCA.")
    if getattr(finetuning_args, "use_megatron_bridge", False):
        raise ValueError(
            "`finetuning_type: blockllm` does not run on the Megatron Bridge backend; unset USE_MEGATRON_BRIDGE."
        )
    if _accelerate_flag("ACCELERATE_USE_FSDP"):
        raise ValueError(
            "`ACCELERATE_USE_FSDP=true` (set by `accelerate launch` with an FSDP config) cannot be combined with "
            "`finetuning_type: blockllm` (supported engines: DDP and DeepSpeed ZeRO-1/2/3); launch with "
            "`FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train`, or with an accelerate config without FSDP."
        )
    if _accelerate_flag("ACCELERATE_USE_DEEPSPEED") and not getattr(training_args, "deepspeed", None):
        raise ValueError(
            "`ACCELERATE_USE_DEEPSPEED=true` (set by `accelerate launch` with a DeepSpeed config) needs the DeepSpeed "
            "config in the `deepspeed:` training argument with `finetuning_type: blockllm`; set `deepspeed: "
            "path/to/ds_config.json` and launch with `FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train`."
        )
    if use_ray():
        raise ValueError(ray_refusal())
    if getattr(model_args, "use_unsloth", False):
        raise ValueError(
            "`use_unsloth: true` cannot be combined with `finetuning_type: blockllm`: unsloth loads the model for "
            "adapter training (its full fine-tuning mode is only on for `finetuning_type: full`); remove "
            "`use_unsloth` (BlockLLM trains the plain model loaded by LLaMA-Factory)."
        )


def requested_finetuning_type(args) -> str | None:
    """``finetuning_type`` in LLaMA-Factory's read arguments (a dict from YAML or JSON, or command-line words)."""
    if isinstance(args, dict):
        return args.get("finetuning_type")
    words = list(args or ())
    for index, word in enumerate(words):
        if word.startswith("--finetuning_type="):
            return word.split("=", 1)[1]
        if word == "--finetuning_type" and index + 1 < len(words):
            return words[index + 1]
    return None

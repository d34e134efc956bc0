"""DeepSpeed with BlockLLM: the config checks and settings made before training, shared by both fronts.

Called through :func:`prepare_deepspeed` when the ``deepspeed`` training argument is set: at parse time by
LLaMA-Factory's front (``patches/engine_setup.py``), by the Trainer front when a trainer is created.
How BlockLLM runs inside ZeRO-1/2/3: :mod:`blockllm_factory.optim.zero`. Nothing here imports DeepSpeed, except
:func:`connect_deepspeed_comm`, which DeepSpeed runs need anyway.
"""

import json
from typing import Any

from blockllm_factory.optim.settings import BLOCK_SIZE_HEAD

from .engine import LLAMAFACTORY_METHOD


def prepare_deepspeed(training_args, settings, method: str = LLAMAFACTORY_METHOD) -> None:
    """Refuses what BlockLLM's ZeRO adapter cannot serve (errors name the argument or key) and sets what it needs:
    DeepSpeed's clipping off (BlockLLM clips), DeepSpeed's communication on the existing process group.

    ``settings``: any object with the ``blockllm_*`` fields (``FinetuningArguments``, ``BlockLLMConfig``)."""
    block_size = getattr(settings, "blockllm_block_size", 0)
    # The default, `head`, falls back to whole tensors there (see hf/optimizer.py); a number is refused.
    if block_size not in (0, BLOCK_SIZE_HEAD):
        raise ValueError(
            f"`blockllm_block_size: {block_size}` cannot be combined with `deepspeed` "
            "(the ZeRO adapter selects whole tensors); set `blockllm_block_size: 0`, or train without `deepspeed`."
        )
    master = getattr(settings, "blockllm_master", "fp32")
    if master != "fp32":
        raise ValueError(
            f"`blockllm_master: {master}` cannot be combined with `deepspeed` (DeepSpeed's fp32 partition is the "
            "master copy there); set `blockllm_master: fp32`, or train without `deepspeed`."
        )
    check_deepspeed_config(read_deepspeed_config(training_args), method)
    leave_clipping_to_blockllm(training_args, method)
    connect_deepspeed_comm()


def read_deepspeed_config(training_args) -> dict[str, Any]:
    """The DeepSpeed config as a dict (``deepspeed:`` may hold a path or a dict), read without importing DeepSpeed."""
    config = training_args.deepspeed
    if isinstance(config, dict):
        return config
    with open(config, encoding="utf-8") as file:
        return json.load(file)


def check_deepspeed_config(config: dict[str, Any], method: str = LLAMAFACTORY_METHOD) -> None:
    """Refuses the DeepSpeed settings that BlockLLM's ZeRO adapter does not serve; errors name the key."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"`zero_optimization.stage` must be 1, 2 or 3 with {method}, got {stage!r} "
            "(for plain data parallelism without ZeRO, launch without `deepspeed`: BlockLLM runs under DDP)."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"`zero_optimization.{key}.device: {device}` cannot be combined with {method} "
                "(BlockLLM updates DeepSpeed's fp32 partition in place on the training device); set it to `none`."
            )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            f"`zero_optimization.elastic_checkpoint: true` cannot be combined with {method} (its "
            "optimizer state is saved per rank, not as flat tensors); remove it."
        )
    if "optimizer" in config:
        raise ValueError(
            "The DeepSpeed config has an `optimizer` section, which would replace BlockLLM; remove it "
            f"({method} builds the optimizer itself)."
        )
    if config.get("zero_allow_untested_optimizer") is not True:
        raise ValueError(
            "Set `zero_allow_untested_optimizer: true` in the DeepSpeed config: BlockLLM is a client optimizer that "
            "DeepSpeed does not know by name (see recipes/deepspeed/)."
        )


def leave_clipping_to_blockllm(training_args, method: str = LLAMAFACTORY_METHOD) -> None:
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
            f"{training_args.max_grad_norm}`; with {method} set `gradient_clipping: auto` and "
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

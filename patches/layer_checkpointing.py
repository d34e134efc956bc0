"""Surface ``llamafactory.model.model_utils.checkpointing``: frozen layers on the gradient path are checkpointed too.

LLaMA-Factory's ``get_custom_gradient_checkpointing_func`` checkpoints a decoder layer only when one of its parameters
requires grad, and runs every other layer plainly. That is right for a layer below every trainable one (its input
needs no grad, autograd keeps nothing), but a frozen layer *above* a trainable one gets an input that requires grad:
run plainly, autograd keeps all of its activations for the backward pass, as if checkpointing were off. Block-wise
methods freeze most layers at each step (BlockLLM, BAdam), so most of their layers are in that case.

With this patch a layer is also checkpointed when its parameters are all frozen but its input (the hidden states, the
first tensor argument) requires grad. The decision is taken at every call, not when checkpointing is enabled: BlockLLM
changes ``requires_grad`` between steps, so a layer frozen now may train at the next step. The math is the same
(checkpointing recomputes the layer's forward in the backward pass with the RNG state restored), so losses and
gradients are bit-identical; only the memory and the recomputation differ.

Whom it affects: ``finetuning_type: blockllm`` runs (``patches/adapter.py`` marks the model), and any run when
``BLOCKLLM_FACTORY_CHECKPOINT_FROZEN_LAYERS=1`` is set, e.g. BAdam in the benchmark harness; ``=0`` turns it off for
BlockLLM too (LLaMA-Factory's own rule then). Every other method is left exactly as LLaMA-Factory ships it. Inert
when gradient checkpointing is off (``disable_gradient_checkpointing: true``).
"""

import functools
import os
from typing import Any

from ._version import check_llamafactory_version

SWITCH_ENV = "BLOCKLLM_FACTORY_CHECKPOINT_FROZEN_LAYERS"
_MARK = "_blockllm_factory_checkpoint_frozen_layers"
_PATCHED_FLAG = "_blockllm_factory_layer_checkpointing"


def mark(model: Any) -> None:
    """Asks for the frozen-layer checkpointing on every layer of ``model`` (a BlockLLM model)."""
    for module in model.modules():
        setattr(module, _MARK, True)


def _switch() -> bool | None:
    """The environment's explicit choice: True (every method), False (none), None (BlockLLM runs only)."""
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def applies_to(layer: Any) -> bool:
    switch = _switch()
    return bool(getattr(layer, _MARK, False)) if switch is None else switch


def _layer_of(func: Any) -> Any:
    return func.func.__self__ if isinstance(func, functools.partial) else func.__self__


def _input_requires_grad(args: tuple) -> bool:
    # Reentrant checkpointing differentiates through positional tensors only; LLaMA-Factory takes the first floating
    # one for the hidden states too.
    for arg in args:
        if hasattr(arg, "is_floating_point") and arg.is_floating_point():
            return bool(arg.requires_grad)
    return False


def build_get_custom_gradient_checkpointing_func(original):
    @functools.wraps(original)
    def get_custom_gradient_checkpointing_func(gradient_checkpointing_func):
        shipped = original(gradient_checkpointing_func)  # LLaMA-Factory's rule, for everything this patch leaves

        @functools.wraps(shipped)
        def custom_gradient_checkpointing_func(func, *args, **kwargs):
            layer = _layer_of(func)
            if (
                applies_to(layer)
                and _input_requires_grad(args)
                and not any(param.requires_grad for param in layer.parameters())
            ):
                return gradient_checkpointing_func(func, *args, **kwargs)
            return shipped(func, *args, **kwargs)

        return custom_gradient_checkpointing_func

    return get_custom_gradient_checkpointing_func


def apply(module) -> None:
    if getattr(module, _PATCHED_FLAG, False):
        return
    check_llamafactory_version()
    # ``_gradient_checkpointing_enable`` looks the function up in its module at every call: replacing it there is
    # enough (no other module copies it).
    module.get_custom_gradient_checkpointing_func = build_get_custom_gradient_checkpointing_func(
        module.get_custom_gradient_checkpointing_func
    )
    setattr(module, _PATCHED_FLAG, True)

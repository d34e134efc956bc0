"""Which engine a BlockLLM run trains on and with which optimizer states, read from transformers' training arguments.

Shared by both fronts: LLaMA-Factory's (``patches/``) and the transformers Trainer's (:mod:`blockllm_factory.hf`).

* DeepSpeed ZeRO-1/2/3 (the ``deepspeed`` training argument): :class:`blockllm_factory.optim.zero.ZeroBlockLLM`,
  the client optimizer DeepSpeed wraps; it clips over the selected blocks itself (DeepSpeed's clipping is turned off
  before training, :mod:`.deepspeed_config`).
* One process or DDP: :class:`blockllm_factory.optim.BlockLLM`; under DDP BlockLLM's weights are left out of DDP and
  BlockLLM averages its compact gradients and probed tensors across ranks itself, in one all-reduce a step
  (:meth:`~blockllm_factory.optim.BlockLLM.average_gradients_across_ranks`): no gradient-sized DDP buckets.
* The ``optim`` training argument picks the precision of the Adam moments, as it does for GaLore: the AdamW names
  give fp32 moments, the bitsandbytes 8-bit names block-wise 8-bit ones (``blockllm_factory/optim/quantization.py``);
  any other value is refused (:func:`check_optim`).
* The AdamW values the Trainer hands BlockLLM (``learning_rate``, ``adam_beta1``, ...) are checked with the optimizer's
  own rules but name the training argument (:func:`check_optimizer_values`), before any model or optimizer work.

The engine is decided once per training arguments, here (:func:`engine_of`, an :class:`Engine`), and every part that
depends on it reads that decision: the optimizer class and its compact gradients (:mod:`.optimizer`), the probe
measurement, the loss feed and the loss scaler's binding (:mod:`.wiring`), the masters and the weights' precision
(``patches/precision.py``), the clipping (DeepSpeed's off, the optimizer's on), and the checks below.
"""

import functools
import weakref
from dataclasses import dataclass

from blockllm_factory.optim.settings import SETTINGS, check, invalid_value

FP32_OPTIMS = ("adamw_torch", "adamw_torch_fused")
EIGHT_BIT_OPTIMS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
LLAMAFACTORY_METHOD = "`finetuning_type: blockllm`"  # how the messages name BlockLLM; the Trainer front names itself


SINGLE, DDP, DEEPSPEED = "single", "ddp", "deepspeed"


@dataclass(frozen=True)
class Engine:
    """The engine a BlockLLM run trains on: ``kind`` (one process, DDP or DeepSpeed), the number of processes and,
    under DeepSpeed, the ZeRO stage (1, 2 or 3; 0 otherwise). FSDP never gets here: :func:`check_ddp` refuses it.

    The properties are what the rest of the code reads; each says which part owns what under this engine."""

    kind: str
    world_size: int = 1
    zero_stage: int = 0

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed wraps the optimizer (``ZeroBlockLLM``): it owns the gradients and the fp32 partitions."""
        return self.kind == DEEPSPEED

    @property
    def compact_gradients(self) -> bool:
        """Whether BlockLLM may compact gradients: not where an engine owns the gradient buffers (DeepSpeed)."""
        return not self.deepspeed

    @property
    def averages_gradients(self) -> bool:
        """Under DDP, BlockLLM averages its own gradients across ranks (the selection's blocks and the probed
        tensors, one all-reduce a step) and its weights are left out of DDP's reducer (:mod:`.wiring`)."""
        return self.kind == DDP

    @property
    def probe_measurement(self) -> str:
        """Where probed blocks are measured: ``hooks`` during backward (one process), ``averaged`` after BlockLLM's
        all-reduce of the hooks' gradients (DDP, :class:`blockllm_factory.optim.distributed.GradientAverager`),
        ``scattered`` by ``ZeroBlockLLM``'s hooks, each probed gradient reduce-scattered into this rank's slice
        (DeepSpeed ZeRO-1/2/3, whose partitions hold the selected tensors only)."""
        return {SINGLE: "hooks", DDP: "averaged", DEEPSPEED: "scattered"}[self.kind]

    @property
    def own_masters(self) -> bool:
        """Whether BlockLLM keeps fp32 masters for half-precision weights (DeepSpeed's fp32 partition is the master
        copy under DeepSpeed)."""
        return not self.deepspeed

    @property
    def clips_in_optimizer(self) -> bool:
        """Under DeepSpeed the optimizer clips over the selection (DeepSpeed's clipping, which would count the probed
        blocks, is off); otherwise the Trainer clips, through the wiring (:mod:`.wiring`)."""
        return self.deepspeed

    @property
    def rebuilds_partitions(self) -> bool:
        """Under DeepSpeed ZeRO-1/2/3 the engine's fp32 and gradient partitions hold the selected tensors only, rebuilt
        when the selection changes (:mod:`.zero3`, :mod:`.zero12`); probed tensors are measured by the optimizer's own
        hooks."""
        return self.deepspeed

    @property
    def loss_in_backward(self) -> bool:
        """DeepSpeed steps inside ``accelerator.backward``, before the Trainer's callbacks: the loss is fed there."""
        return self.deepspeed

    @property
    def non_reentrant_checkpointing(self) -> str | None:
        """Why this engine needs non-reentrant gradient checkpointing (None where reentrant is fine): DDP's search for
        unused parameters cannot see a reentrant checkpoint's forward inside the backward pass; under ZeRO-3 a
        reentrant checkpoint recomputes its layer before the layer's backward begins, so DeepSpeed attributes the
        frozen weights it gathers for it to the enclosing model and releases them only when the whole backward pass
        ends (docs/distributed.md, "ZeRO-3 and gradient checkpointing")."""
        if self.kind == DDP:
            return "reentrant checkpointing hides parameters from DDP's search for unused ones"
        if self.deepspeed and self.zero_stage == 3:
            return (
                "with reentrant checkpointing DeepSpeed keeps every frozen weight it gathers for the backward pass's "
                "recomputation until the whole backward pass ends"
            )
        return None

    def keeps_half_precision_weights(self, dtype) -> bool:
        """Whether bf16/fp16 weights stay in half precision with BlockLLM's masters for the selection: where BlockLLM
        owns the masters, for bf16, and for fp16 only with compact gradients (an fp32 buffer the GradScaler can
        unscale; dense fp16 gradients the GradScaler refuses to unscale)."""
        import torch

        if not self.own_masters:
            return False
        return dtype == torch.bfloat16 or (dtype == torch.float16 and self.compact_gradients)

    def describe(self) -> str:
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}, {self.world_size} process(es)"
        return f"DDP, {self.world_size} processes" if self.kind == DDP else "one process"


# Decisions made, by the training arguments they were made from (weakly: they go with the arguments).
_DECIDED: dict[int, tuple[weakref.ref, Engine]] = {}


def _decide(training_args) -> Engine:
    world_size = max(1, int(getattr(training_args, "world_size", 1) or 1))
    if getattr(training_args, "deepspeed", None):
        hf_config = getattr(training_args, "hf_deepspeed_config", None)
        if hf_config is not None:
            config = hf_config.config
        else:
            from .deepspeed_config import read_deepspeed_config

            config = read_deepspeed_config(training_args)
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        return Engine(DEEPSPEED, world_size, stage if isinstance(stage, int) else 0)
    return Engine(DDP if world_size > 1 else SINGLE, world_size)


def engine_of(training_args) -> Engine:
    """The engine of the run these training arguments describe, decided on the first call and kept for the same
    arguments object (arguments that cannot be weakly referenced, such as a ``SimpleNamespace``, are decided each call,
    from the same rule)."""
    entry = _DECIDED.get(id(training_args))
    if entry is not None and entry[0]() is training_args:
        return entry[1]
    engine = _decide(training_args)
    try:
        key = id(training_args)
        reference = weakref.ref(training_args, lambda _, key=key: _DECIDED.pop(key, None))
    except TypeError:
        return engine
    _DECIDED[key] = (reference, engine)
    return engine


def blockllm_optimizer_class(training_args):
    """BlockLLM, or under DeepSpeed ZeRO the variant that DeepSpeed can wrap (see blockllm_factory/optim/zero.py)."""
    decided = engine_of(training_args)
    if decided.clips_in_optimizer:
        from blockllm_factory.optim.zero import ZeroBlockLLM

        # The optimizer clips over the selected blocks itself; DeepSpeed's clipping is off (see deepspeed_config.py).
        options = {
            "max_grad_norm": float(training_args.max_grad_norm or 0.0),
            # a probed gradient's slice is reduced to its norm at the step's last backward pass
            "micro_steps": max(1, int(getattr(training_args, "gradient_accumulation_steps", 1) or 1)),
        }
        if decided.rebuilds_partitions:
            from .zero3 import Zero3Partitions
            from .zero12 import Zero12Partitions  # handed DeepSpeed's engine by the wiring (hf/wiring.py)

            options["partitions"] = Zero3Partitions() if decided.zero_stage == 3 else Zero12Partitions()
        return functools.partial(ZeroBlockLLM, **options)
    from blockllm_factory.optim import BlockLLM

    return BlockLLM


def optim_name(training_args) -> str:
    optim = training_args.optim
    return str(getattr(optim, "value", optim))


def check_optim(training_args, method: str = LLAMAFACTORY_METHOD) -> None:
    """Errors name ``optim`` and the values BlockLLM accepts."""
    name = optim_name(training_args)
    if name not in FP32_OPTIMS + EIGHT_BIT_OPTIMS:
        raise ValueError(
            f"`optim: {name}` cannot be combined with {method} (BlockLLM is itself the optimizer); "
            f"use one of {', '.join(FP32_OPTIMS)} (fp32 Adam moments) or {', '.join(EIGHT_BIT_OPTIMS)} (8-bit "
            "moments through bitsandbytes)."
        )
    if name in EIGHT_BIT_OPTIMS:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"`optim: {name}` needs bitsandbytes for BlockLLM's 8-bit moments: pip install bitsandbytes"
            ) from error


def check_optimizer_values(training_args) -> None:
    """The AdamW settings the training arguments hand BlockLLM, checked with the optimizer's own rules
    (``optim/settings.py``) but naming the training argument, when the arguments are checked rather than when the
    optimizer is created (in the Trainer, at the start of ``train()``)."""
    args = training_args
    # field -> (the optimizer's keyword, the value it would get, what the field allows)
    values = {
        "learning_rate": ("lr", args.learning_rate, SETTINGS["lr"].allowed),
        "adam_beta1": ("betas", (args.adam_beta1, 0.0), "a number in [0, 1)"),
        "adam_beta2": ("betas", (0.0, args.adam_beta2), "a number in [0, 1)"),
        "adam_epsilon": ("eps", args.adam_epsilon, SETTINGS["eps"].allowed),
        "weight_decay": ("weight_decay", args.weight_decay, SETTINGS["weight_decay"].allowed),
    }
    for field, (name, value, allowed) in values.items():
        try:
            check(name, value)
        except ValueError:
            raise invalid_value(field, allowed, getattr(args, field)) from None


def optim_bits(training_args) -> int:
    """32 or 8: the precision of BlockLLM's Adam moments for this ``optim``."""
    return 8 if optim_name(training_args) in EIGHT_BIT_OPTIMS else 32


def check_ddp(training_args, method: str = LLAMAFACTORY_METHOD) -> None:
    """FSDP is refused; under DDP, DDP looks for unused parameters every step (set; an explicit ``false`` refused),
    and the Trainer's optimizer state loads onto an indexed CPU device (:mod:`.serialization`), for resuming on CPU.

    BlockLLM's own weights are left out of DDP (:mod:`.wiring`); the search for unused parameters serves a DDP over
    trainable parameters BlockLLM does not own, whose use may change with BlockLLM's selection."""
    if getattr(training_args, "fsdp", None):
        raise ValueError(
            f"`fsdp` cannot be combined with {method} (supported engines: DDP and DeepSpeed "
            "ZeRO-1/2/3); remove `fsdp`."
        )
    if engine_of(training_args).kind != DDP:
        return
    if training_args.ddp_find_unused_parameters is False:
        raise ValueError(
            f"`ddp_find_unused_parameters: false` cannot be combined with {method} under DDP: the "
            "parameters that produce gradients change with BlockLLM's selection; remove it (it is set to true)."
        )
    if training_args.ddp_static_graph:
        raise ValueError(
            f"`ddp_static_graph: true` cannot be combined with {method}: the set of parameters "
            "that produce gradients changes with BlockLLM's selection; remove it."
        )
    training_args.ddp_find_unused_parameters = True
    from .serialization import allow_loading_on_indexed_cpu

    allow_loading_on_indexed_cpu()  # so that a DDP run on CPU can resume (the Trainer loads onto `cpu:0`)

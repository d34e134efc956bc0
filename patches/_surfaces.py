"""What each patch reads or replaces in LLaMA-Factory and the libraries under it, checked before it changes anything.

Instead of accepting one LLaMA-Factory release, the import hook (``blockllm_factory/_import_hook.py``) calls
:func:`check_surfaces` for every watched module right before that module's patch runs: every function, class, method,
dataclass field and dictionary key listed here for the module must exist, and a function's leading parameters must be
the ones the patch calls it with (a further parameter must have a default). A release that changed none of them, such
as LLaMA-Factory's main branch (0.9.6.dev0), is patched; one that did is refused with a message naming each missing
or changed surface (the hook reports it, and ``finetuning_type: blockllm`` is then refused with it at parse time).

DeepSpeed's internals are only needed by runs that use DeepSpeed; :func:`check_deepspeed_surfaces` runs at parse time
for those.
"""

import dataclasses
import functools
import importlib
import inspect
import os
import re
from dataclasses import dataclass

from blockllm_factory._files import BENCH_OUT_ENV

from ._version import installed_version
from .arguments import EXCLUSIVE_FLAGS


@dataclass(frozen=True)
class Surface:
    """``path`` (dotted, from ``module``) must exist; optional shape checks of what it is."""

    module: str
    path: str
    parameters: tuple[str, ...] | None = None  # leading parameter names of a function or method
    fields: tuple[str, ...] = ()  # dataclass fields of a class
    keys: tuple[str, ...] = ()  # keys of a dict
    # Attributes the class gives its instances (``self.<name> =`` or ``self.<name>, ... =`` in the class's source).
    attributes: tuple[str, ...] = ()
    own: bool = False  # defined on the class itself, not inherited (the patch replaces it there)
    only_with_env: str | None = None  # needed only when this environment variable is set

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"


FINETUNING_FIELDS = ("finetuning_type", "stage", "plot_loss", "freeze_vision_tower", *EXCLUSIVE_FLAGS)
MODEL_FIELDS = ("model_name_or_path", "use_unsloth", "resize_vocab", "train_from_scratch", "trust_remote_code")
_TRAINER_API = (
    Surface("transformers", "Trainer.training_step", ("self", "model", "inputs")),
    Surface("transformers", "Trainer._clip_grad_norm", ("self", "model")),
    Surface("transformers", "Trainer._get_grad_norm", ("self", "model")),
    Surface("transformers", "Trainer", attributes=("args", "model", "model_wrapped", "optimizer", "accelerator")),
    Surface("transformers", "Trainer._save_optimizer_and_scheduler", ("self", "output_dir")),
    Surface("transformers", "Trainer.save_model", ("self", "output_dir")),  # patches/trainer.py, _save_together
    Surface("transformers", "Trainer.add_callback", ("self", "callback")),
    Surface("transformers", "Trainer.remove_callback", ("self", "callback")),
    Surface("transformers", "TrainerCallback.on_pre_optimizer_step"),
    Surface("transformers", "TrainerCallback.on_optimizer_step"),
    Surface("transformers", "TrainingArguments", fields=("deepspeed", "fsdp", "ddp_find_unused_parameters")),
    Surface("accelerate", "Accelerator.reduce", ("self", "tensor", "reduction")),
    Surface("accelerate", "Accelerator.backward", ("self", "loss")),
    Surface("accelerate", "Accelerator.sync_gradients"),
    Surface("accelerate", "Accelerator.optimizer_step_was_skipped"),
    Surface("accelerate", "Accelerator.unscale_gradients", ("self",)),
    # Under DDP BlockLLM's weights are left out of DDP (blockllm_factory/hf/wiring.py, _average_instead_of_ddp).
    Surface("accelerate", "Accelerator.prepare_model", ("self", "model", "device_placement", "evaluation_mode")),
    Surface(
        "torch.nn.parallel",
        "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
        ("module", "params_and_buffers_to_ignore"),
    ),
    Surface("accelerate", "Accelerator.prepare", ("self",)),  # wrapped: DeepSpeed's engine handed to zero12.py
    Surface("accelerate", "Accelerator", attributes=("scaler", "deepspeed_engine_wrapped")),
    Surface("llamafactory.extras.logging", "get_logger", ("name",)),
)


def _trainer(module: str, class_name: str) -> tuple[Surface, ...]:
    return (
        Surface(module, f"{class_name}.create_optimizer", ("self",), own=True),
        Surface(module, class_name, attributes=("finetuning_args",)),
        *_TRAINER_API,
    )


# Watched module -> (the patch file, what it needs). Keep in step with the patches when they change.
ARGUMENTS = "llamafactory.hparams.finetuning_args"
PARSER = "llamafactory.hparams.parser"
ADAPTER = "llamafactory.model.adapter"
CHECKPOINTING = "llamafactory.model.model_utils.checkpointing"
TRAINER_UTILS = "llamafactory.train.trainer_utils"
TUNER = "llamafactory.train.tuner"
WEBUI_TRAIN = "llamafactory.webui.components.train"
WEBUI_RUNNER = "llamafactory.webui.runner"
SURFACES: dict[str, tuple[str, tuple[Surface, ...]]] = {
    ARGUMENTS: (
        "arguments",
        (
            Surface(ARGUMENTS, "FinetuningArguments", fields=FINETUNING_FIELDS),
            Surface(ARGUMENTS, "FinetuningArguments.__post_init__", ("self",)),
            Surface(ARGUMENTS, "LoraArguments", fields=("lora_rank",)),
            Surface(ARGUMENTS, "OFTArguments"),
            Surface(ARGUMENTS, "FreezeArguments", fields=("freeze_trainable_layers",)),
        ),
    ),
    PARSER: (
        "parser",
        (
            Surface(PARSER, "_check_extra_dependencies", ("model_args", "finetuning_args", "training_args")),
            Surface(PARSER, "get_train_args", ("args",)),
            Surface(PARSER, "get_ray_args", ("args",)),
            Surface(PARSER, "read_args", ("args",)),
            Surface(PARSER, "logger.warning_rank0"),
            Surface(PARSER, "ModelArguments", fields=MODEL_FIELDS),
        ),
    ),
    ADAPTER: (
        "adapter",
        (
            Surface(ADAPTER, "init_adapter", ("config", "model", "model_args", "finetuning_args", "is_trainable")),
            Surface(ADAPTER, "logger.info_rank0"),
        ),
    ),
    # Frozen layers on the gradient path are checkpointed: LLaMA-Factory's wrapper is wrapped, and the layer is found
    # the way it finds it (the bound ``__call__`` of a transformers GradientCheckpointingLayer, maybe in a partial).
    CHECKPOINTING: (
        "layer_checkpointing",
        (
            Surface(CHECKPOINTING, "get_custom_gradient_checkpointing_func", ("gradient_checkpointing_func",)),
            Surface(
                CHECKPOINTING,
                "_gradient_checkpointing_enable",
                ("self", "gradient_checkpointing_kwargs", "use_unsloth_gc"),
            ),
            Surface(CHECKPOINTING, "prepare_model_for_training", ("model", "model_args")),
            Surface("transformers.modeling_layers", "GradientCheckpointingLayer.__call__", ("self",)),
        ),
    ),
    TRAINER_UTILS: (
        "optimizer",
        (
            Surface(TRAINER_UTILS, "create_custom_optimizer", ("model", "training_args", "finetuning_args")),
            Surface(TRAINER_UTILS, "_get_decay_parameter_names", ("model",)),
            Surface(TRAINER_UTILS, "logger.info_rank0"),
        ),
    ),
    "llamafactory.train.pt.trainer": ("trainer", _trainer("llamafactory.train.pt.trainer", "CustomTrainer")),
    "llamafactory.train.sft.trainer": ("trainer", _trainer("llamafactory.train.sft.trainer", "CustomSeq2SeqTrainer")),
    "llamafactory.train.rm.trainer": ("trainer", _trainer("llamafactory.train.rm.trainer", "PairwiseTrainer")),
    "llamafactory.train.dpo.trainer": ("trainer", _trainer("llamafactory.train.dpo.trainer", "CustomDPOTrainer")),
    "llamafactory.train.kto.trainer": ("trainer", _trainer("llamafactory.train.kto.trainer", "CustomKTOTrainer")),
    # The bench measurement only; inert (and not needed) unless the harness asks for it.
    TUNER: (
        "metrics",
        (
            Surface(TUNER, "_training_function", ("config",), only_with_env=BENCH_OUT_ENV),
            Surface(TUNER, "get_train_args", only_with_env=BENCH_OUT_ENV),
        ),
    ),
    "llamafactory.webui.locales": (
        "webui_locales",
        (Surface("llamafactory.webui.locales", "LOCALES", keys=("finetuning_type",)),),
    ),
    "llamafactory.webui.components.top": (
        "webui",
        (
            Surface("llamafactory.webui.components.top", "METHODS"),
            Surface("llamafactory.webui.components.top", "create_top"),
        ),
    ),
    WEBUI_TRAIN: (
        "webui",
        (
            Surface(WEBUI_TRAIN, "create_train_tab", ("engine",)),
            Surface("llamafactory.webui.engine", "Engine", attributes=("manager",)),
            Surface("llamafactory.webui.manager", "Manager.get_base_elems", ("self",)),
            Surface("llamafactory.webui.manager", "Manager.get_elem_by_id", ("self", "elem_id")),
            *(Surface("gradio", name) for name in ("Accordion", "Row", "Checkbox", "Slider", "Dropdown", "update")),
        ),
    ),
    WEBUI_RUNNER: (
        "webui",
        (
            Surface(WEBUI_RUNNER, "Runner", attributes=("manager",)),
            Surface(WEBUI_RUNNER, "Runner._parse_train_args", ("self", "data")),
            Surface(WEBUI_RUNNER, "Runner._initialize", ("self", "data", "do_train", "from_preview")),
            *(
                Surface("llamafactory.extras.misc", name)
                for name in ("get_device_count", "is_env_enabled", "use_kt", "use_ray")
            ),
        ),
    ),
}

# What blockllm_factory/optim/zero.py, blockllm_factory/hf/deepspeed_config.py, blockllm_factory/hf/zero3.py and
# blockllm_factory/hf/zero12.py use inside DeepSpeed.
ZERO3_MODULE, ZERO3 = "deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"
ZERO12_MODULE, ZERO12 = "deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"
BF16_MODULE, BF16 = "deepspeed.runtime.bf16_optimizer", "BF16_Optimizer"  # ZeRO-1 with bf16 weights
DEEPSPEED_SURFACES = (
    Surface("deepspeed", "init_distributed"),
    Surface(
        "deepspeed.utils.tensor_fragment",
        "tensor_fragment",
        fields=("lp_fragment_address", "hp_fragment_address", "hp_fragment"),
    ),
    # ZeRO-1/2's partitions rebuilt to BlockLLM's selection (blockllm_factory/hf/zero12.py): the engine's own
    # constructor path of its optimizer, re-run.
    Surface("deepspeed.runtime.engine", "DeepSpeedEngine._configure_zero_optimizer", ("self", "optimizer")),
    Surface("deepspeed.runtime.engine", "DeepSpeedEngine._configure_bf16_optimizer", ("self", "optimizer")),
    Surface("deepspeed.runtime.engine", "DeepSpeedEngine", attributes=("optimizer",)),
    *(
        Surface(module, f"{name}.{method}", parameters)
        for module, name in ((ZERO12_MODULE, ZERO12), (BF16_MODULE, BF16))
        for method, parameters in (("update_lp_params", ("self",)), ("load_state_dict", ("self", "state_dict_list")))
    ),
    Surface(ZERO12_MODULE, ZERO12, attributes=("bit16_groups", "_grad_acc_hooks", "dp_process_group", "optimizer")),
    Surface(BF16_MODULE, BF16, attributes=("bf16_groups", "_grad_acc_hooks", "dp_process_group", "optimizer")),
    Surface("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.get_param_id", ("self", "param")),
    Surface("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups"),
    *(
        # ZeRO-3's partitions rebuilt to BlockLLM's selection (blockllm_factory/hf/zero3.py).
        Surface(ZERO3_MODULE, f"{ZERO3}.{method}", parameters)
        for method, parameters in (
            ("_reassign_or_swap_out_partitioned_parameters", None),  # wrapped by DeepSpeed: (*args, **kwargs)
            ("_create_fp16_partitions_with_defragmentation", ("self", "fp16_param_groups")),
            ("_setup_for_real_optimizer", ("self",)),
            ("set_grad_positions", ("self",)),
            ("create_reduce_and_remove_grad_hooks", ("self",)),
            ("_get_param_coordinator", ("self",)),
        )
    ),
    *(
        Surface("deepspeed.runtime.zero.partitioned_param_coordinator", f"PartitionedParameterCoordinator.{method}")
        for method in ("_invalidate_trace", "is_invalid_trace")
    ),
    Surface(
        ZERO3_MODULE,
        ZERO3,
        attributes=(
            "fp16_groups",
            "fp16_partitioned_groups",
            "fp16_partitioned_groups_flat",
            "fp16_partitioned_groups_flat_numel",
            "fp16_partitioned_groups_flat_id",
            "groups_padding",
            "fp32_partitioned_groups_flat",
            "sub_group_to_group_id",
            "sub_group_process_groups",
            "sub_group_partition_counts",
            "averaged_gradients",
            "lp_param_buffer",
            "grad_partitions_flat_buffer",
            "trainable_param_groups",
            "param_dict",
            "params_already_reduced",
            "grad_position",
            "_grad_acc_hooks",
            "_leaf_module_hooks",
        ),
    ),
)


def _resolve(module, path: str):
    value = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _parameters(function) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return None


def problem(surface: Surface, module=None) -> str | None:
    """What is wrong with ``surface`` (``module``: the object ``surface.module`` names, if already at hand)."""
    if surface.only_with_env and not os.environ.get(surface.only_with_env):
        return None
    try:
        module = importlib.import_module(surface.module) if module is None else module
        value = _resolve(module, surface.path)
    except (ImportError, AttributeError):
        return f"`{surface.name}` (missing)"
    if surface.own:
        owner_path, _, attribute = surface.path.rpartition(".")
        if attribute not in vars(_resolve(module, owner_path)):
            return f"`{surface.name}` (not defined by that class itself)"
    if surface.parameters is not None:
        parameters = _parameters(value)
        if parameters is not None:
            names = tuple(parameter.name for parameter in parameters[: len(surface.parameters)])
            extra_required = [
                parameter.name
                for parameter in parameters[len(surface.parameters) :]
                if parameter.default is inspect.Parameter.empty
                and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            ]
            if names != surface.parameters or extra_required:
                found = ", ".join(parameter.name for parameter in parameters)
                return f"`{surface.name}({', '.join(surface.parameters)})` (found ({found}))"
    if surface.fields:
        names = {spec.name for spec in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else set()
        missing = [name for name in surface.fields if name not in names]
        if missing:
            return f"`{surface.name}` fields {', '.join(missing)} (missing)"
    if surface.keys:
        missing = [key for key in surface.keys if not isinstance(value, dict) or key not in value]
        if missing:
            return f"`{surface.name}` keys {', '.join(missing)} (missing)"
    if surface.attributes:
        given = _instance_attributes(value)
        missing = [name for name in surface.attributes if name not in given]
        if missing:
            return f"`{surface.name}` instance attributes {', '.join(missing)} (missing)"
    return None


def _instance_attributes(cls) -> set[str]:
    """The attributes that ``cls`` and its bases give their instances: every ``self.<name> =`` (or
    ``self.<name>, ... =``) in the files that define them, each file read once."""
    names = set()
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:  # a builtin class
            continue
        if path:
            names |= _assigned_in_file(path)
    return names


@functools.cache
def _assigned_in_file(path: str) -> frozenset[str]:
    with open(path, encoding="utf-8") as file:
        return frozenset(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?(?:,[^=\n]*)?=(?!=)", file.read()))


def _distribution(module_name: str) -> str:
    return module_name.split(".")[0]


def _raise(patch: str, problems: list[tuple[Surface, str]]) -> None:
    packages = dict.fromkeys(["llamafactory", *(_distribution(surface.module) for surface, _ in problems)])
    versions = ", ".join(f"{package} {installed_version(package)}" for package in packages)
    raise RuntimeError(
        f"blockllm-factory does not support this installation ({versions}): {patch} needs "
        f"{'; '.join(text for _, text in problems)}"
    )


def check_surfaces(fullname: str, module) -> None:
    """Raises ``RuntimeError`` naming every surface of ``fullname`` that ``module`` (or a library) lacks."""
    if fullname not in SURFACES:
        return
    patch, surfaces = SURFACES[fullname]
    problems = []
    for surface in surfaces:
        text = problem(surface, module if surface.module == fullname else None)
        if text is not None:
            problems.append((surface, text))
    if problems:
        _raise(f"patches/{patch}.py", problems)


def check_deepspeed_surfaces() -> None:
    """For runs that use DeepSpeed: what BlockLLM's ZeRO adapter reads in DeepSpeed's optimizers."""
    problems = [(surface, text) for surface in DEEPSPEED_SURFACES if (text := problem(surface)) is not None]
    if problems:
        _raise("blockllm_factory/optim/zero.py", problems)

"""Defaults that would silently cost a ``finetuning_type: blockllm`` run, caught at parse time from the model's files.

Called from :func:`.parser.check_training_setup`, before any weight is loaded. What the checks need from the model is
read from its ``config.json`` and the headers of its ``*.safetensors`` files (names and shapes, no tensor data): for a
local directory, or a Hugging Face hub model already in the local cache, or (online) the hub's header service.

* ``train_from_scratch: true`` with ``blockllm_include_embeddings: false`` (or ``auto`` where it means false: under
  DDP, DeepSpeed or with ``blockllm_block_size: 0``): the randomly initialised input embeddings and output head would
  never be trained. Refused.
* ``resize_vocab: true`` with the embeddings left out as above: the rows added for new tokens keep their initial
  values. Warned.
* Once the model is set up (:func:`check_embedding_modules`, from patches/adapter.py): the same two with ``auto``
  where the model's embedding modules are not plain ``nn.Embedding`` / ``nn.Linear`` (Gemma's scaled embeddings), which
  makes ``auto`` false there (or where no module holds them). Refused / warned, naming them.
* ``freeze_vision_tower: false`` on a vision-language model whose tower holds blocks that BlockLLM never selects
  without ``blockllm_include_embeddings`` (patch and position embeddings): those stay frozen. Warned, naming them.
* DeepSpeed ZeRO-3 whose ``zero_optimization.sub_group_size`` (DeepSpeed's default 1e9 when absent) is smaller than
  the parameters each process holds: DeepSpeed would cut them into several sub-groups, one ``step()`` each, which
  BlockLLM cannot serve (otherwise found only at the first step). Refused, naming the size needed.
"""

import json
import math
import os
import struct
from pathlib import Path

from blockllm_factory.optim.settings import EMBEDDINGS_AUTO

DEEPSPEED_DEFAULT_SUB_GROUP_SIZE = 1e9  # DeepSpeedZeroConfig.sub_group_size
NAMES_SHOWN = 4


def _listed(names: list[str]) -> str:
    """The first NAMES_SHOWN of ``names``, comma-separated, and how many more there are."""
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"{', '.join(names[:NAMES_SHOWN])}{more}"


def _safetensors_header(path: Path) -> dict[str, int]:
    """Tensor name -> number of elements, from a safetensors file's JSON header (8-byte length, then the JSON)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return {name: math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def _local_directory(model_args) -> Path | None:
    path = Path(str(model_args.model_name_or_path))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(model_args.model_name_or_path),
                revision=getattr(model_args, "model_revision", None),
                cache_dir=getattr(model_args, "cache_dir", None),
                local_files_only=True,
            )
        )
    except Exception:  # noqa: BLE001 - not in the local cache: try the hub below
        return None


def checkpoint_tensors(model_args) -> dict[str, int] | None:
    """Name -> number of elements of every tensor in the model's safetensors files; None when they cannot be read."""
    directory = _local_directory(model_args)
    if directory is not None:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            return None
        tensors = {}
        for file in files:
            tensors.update(_safetensors_header(file))
        return tensors
    if _offline():
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        metadata = get_safetensors_metadata(
            str(model_args.model_name_or_path), revision=getattr(model_args, "model_revision", None)
        )
    except Exception:  # noqa: BLE001 - no hub access, or not a safetensors model: the check is skipped
        return None
    return {
        name: math.prod(info.shape) for file in metadata.files_metadata.values() for name, info in file.tensors.items()
    }


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def model_type(model_args) -> str | None:
    """``model_type`` from the model's ``config.json`` (a local folder, the hub cache, or the hub); None if unread."""
    directory = _local_directory(model_args)
    config = directory / "config.json" if directory is not None else None
    if config is None and not _offline():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(
                hf_hub_download(
                    str(model_args.model_name_or_path),
                    "config.json",
                    revision=getattr(model_args, "model_revision", None),
                    cache_dir=getattr(model_args, "cache_dir", None),
                )
            )
        except Exception:  # noqa: BLE001 - no hub access: the check is skipped
            return None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ embeddings
def includes_embeddings(finetuning_args, training_args=None) -> bool:
    """Whether the run will train the embeddings and the head, as far as the arguments tell: ``true``, or ``auto`` in
    one process with row-group blocks (blockllm_factory/hf/optimizer.py resolves ``auto`` with the model too: embedding
    modules of other types than ``nn.Embedding`` / ``nn.Linear``, e.g. Gemma's scaled ones, make it false: the run's
    log line says so, and :func:`check_embedding_modules` refuses or warns where that would cost the run)."""
    value = finetuning_args.blockllm_include_embeddings
    if value != EMBEDDINGS_AUTO:
        return bool(value)
    if training_args is None:  # the engine unknown: only the block size tells
        return finetuning_args.blockllm_block_size != 0
    from blockllm_factory.hf.engine import engine_of
    from blockllm_factory.hf.optimizer import embeddings_engine

    return embeddings_engine(engine_of(training_args), finetuning_args.blockllm_block_size)


def _left_out(finetuning_args) -> str:
    value = finetuning_args.blockllm_include_embeddings
    if value == EMBEDDINGS_AUTO:
        return f"`blockllm_include_embeddings: {EMBEDDINGS_AUTO}` (false under DDP, DeepSpeed and with whole tensors)"
    return "`blockllm_include_embeddings: false`"


def check_embeddings(model_args, finetuning_args, logger, training_args=None) -> None:
    if includes_embeddings(finetuning_args, training_args):
        return
    if getattr(model_args, "train_from_scratch", False):
        raise ValueError(
            f"`train_from_scratch: true` with {_left_out(finetuning_args)} would never train the randomly "
            "initialised input embeddings and output head; set `blockllm_include_embeddings: true`."
        )
    if getattr(model_args, "resize_vocab", False):
        logger.warning_rank0(
            f"`resize_vocab: true` with {_left_out(finetuning_args)}: BlockLLM never selects the input "
            "embeddings or the output head, so rows added for new tokens keep their initial values; set "
            "`blockllm_include_embeddings: true` to train them."
        )


def check_embedding_modules(model, model_args, finetuning_args, logger) -> None:
    """The part of :func:`check_embeddings` that needs the model: ``auto`` also means false where a module holding the
    embeddings or the head is not a plain ``nn.Embedding`` / ``nn.Linear`` (Gemma's scaled embeddings), which the
    parse-time check cannot see. Called once the model is set up for training (patches/adapter.py)."""
    if not (getattr(model_args, "train_from_scratch", False) or getattr(model_args, "resize_vocab", False)):
        return
    if finetuning_args.blockllm_include_embeddings != EMBEDDINGS_AUTO:
        return
    from blockllm_factory.optim.rows import unserved_embeddings
    from blockllm_factory.optim.selection import is_embedding_name

    reasons = unserved_embeddings(model, is_embedding_name)  # empty exactly where `auto` trains them as rows
    if not reasons:
        return
    why = (
        f"`blockllm_include_embeddings: {EMBEDDINGS_AUTO}` leaves the embeddings and the head frozen on this model: "
        f"{_listed(reasons)}: BlockLLM keeps their gradients as rows only where plain nn.Embedding / nn.Linear "
        "modules alone hold them"
    )
    if getattr(model_args, "train_from_scratch", False):
        raise ValueError(
            f"`train_from_scratch: true`: {why}, so the randomly initialised input embeddings and output head would "
            "never be trained; set `blockllm_include_embeddings: true` (their gradients are then whole tensors)."
        )
    logger.warning_rank0(
        f"`resize_vocab: true`: {why}, so rows added for new tokens keep their initial values; set "
        "`blockllm_include_embeddings: true` to train them."
    )


def frozen_tower_blocks(model_args, finetuning_args, training_args=None) -> list[str] | None:
    """Vision-tower parameters that ``freeze_vision_tower: false`` asks to train but BlockLLM never selects.

    ``[]``: nothing to say; ``None``: a vision-language model whose files could not be read.
    """
    if finetuning_args.freeze_vision_tower or includes_embeddings(finetuning_args, training_args):
        return []
    from llamafactory.model.model_utils.visual import COMPOSITE_MODELS

    from blockllm_factory.optim.selection import is_embedding_name

    kind = model_type(model_args)
    if kind not in COMPOSITE_MODELS:
        return []
    tensors = checkpoint_tensors(model_args)
    if tensors is None:
        return None
    tower_keys = COMPOSITE_MODELS[kind].vision_model_keys
    # LLaMA-Factory freezes a tower by substring match on parameter names; the same rule finds its parameters here.
    return [name for name in tensors if any(key in name for key in tower_keys) and is_embedding_name(name)]


def check_vision_tower(model_args, finetuning_args, logger, training_args=None) -> None:
    blocks = frozen_tower_blocks(model_args, finetuning_args, training_args)
    if blocks == []:
        return
    if blocks is None:  # the model's files could not be read
        which = "the vision tower's embedding parameters (patch and position embeddings)"
    else:
        which = f"these vision-tower parameters: {_listed(blocks)}"
    logger.warning_rank0(
        f"`freeze_vision_tower: false` with {_left_out(finetuning_args)}: BlockLLM never selects "
        f"{which}, so they stay frozen; set `blockllm_include_embeddings: true` to train them (the text embeddings "
        "and output head then become eligible too)."
    )


# ------------------------------------------------------------------------------------------------ ZeRO-3 sub-groups
def per_process_parameters(tensors: dict[str, int], world_size: int) -> int:
    """What DeepSpeed ZeRO-3 puts in one process's partition: each parameter padded to a multiple of world_size."""
    return sum(math.ceil(numel / world_size) for numel in tensors.values())


def check_zero3_sub_group_size(model_args, training_args, config: dict) -> None:
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        return
    sub_group_size = zero.get("sub_group_size", DEEPSPEED_DEFAULT_SUB_GROUP_SIZE)
    if isinstance(sub_group_size, bool) or not isinstance(sub_group_size, int | float):
        return  # DeepSpeed will say what it makes of it
    tensors = checkpoint_tensors(model_args)
    if tensors is None:
        return  # checked again on the first step (blockllm_factory/optim/zero.py)
    world_size = max(1, int(getattr(training_args, "world_size", 1) or 1))
    needed = per_process_parameters(tensors, world_size)
    if sub_group_size < needed:
        raise ValueError(
            f"`zero_optimization.sub_group_size: {sub_group_size:g}` in the DeepSpeed config is smaller than the "
            f"{needed:,} parameters each of the {world_size} process(es) holds under ZeRO-3: DeepSpeed would split "
            "them into sub-groups, which BlockLLM cannot step; set it to at least "
            f"{needed:,} (e.g. 1e12, as recipes/deepspeed/ds_z3_blockllm.json does)."
        )


def check_model_setup(model_args, finetuning_args, training_args, deepspeed_config: dict | None, logger) -> None:
    """Refuses or warns about the defaults above; errors name the argument, its value and what to set instead."""
    check_embeddings(model_args, finetuning_args, logger, training_args)
    if deepspeed_config is not None:
        check_zero3_sub_group_size(model_args, training_args, deepspeed_config)
    check_vision_tower(model_args, finetuning_args, logger, training_args)

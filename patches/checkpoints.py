"""Which checkpoint a ``finetuning_type: blockllm`` run resumes from, and whether it can resume from it exactly.

Called at parse time from :func:`.parser.check_training_setup` (for every stage but rm, which LLaMA-Factory never
resumes), before any model loads:

* a checkpoint whose save was interrupted (no complete ``trainer_state.json``) is never resumed from; automatic
  resume falls back to the last complete one with a warning;
* the checkpoint resumed from must hold every file a resume reads, each complete: the optimizer state and the
  learning-rate schedule (missing after ``save_only_model: true``: BlockLLM would silently start its selection and the
  schedule afresh), the model weights and the RNG states; the optimizer and scheduler files must match the checksums
  saved beside them (``blockllm_checkpoint.json``), and BlockLLM's settings that decide its blocks must be the
  checkpoint's (one left at its ``auto`` default takes the checkpoint's value). Each refusal names the file or the
  field.

:func:`write_checkpoint_record` writes ``blockllm_checkpoint.json``; the trainer patch calls it right after the
Trainer saved the optimizer and scheduler, before ``trainer_state.json`` (which the Trainer writes last).
"""

import glob
import hashlib
import json
import os
import struct
import zipfile

from blockllm_factory._files import write_json
from blockllm_factory.hf.engine import engine_of
from blockllm_factory.hf.serialization import OPTIMIZER_FILE, SCHEDULER_FILE, adopted_setting, check_state_files
from blockllm_factory.optim.settings import EMBEDDINGS_AUTO, SETTINGS

COMPLETION_MARKER = "trainer_state.json"  # the Trainer writes it last when it saves a checkpoint
RECORD = "blockllm_checkpoint.json"  # checksums and settings, written beside the optimizer state
CHECKSUMMED = (OPTIMIZER_FILE, SCHEDULER_FILE)
# Settings whose change gives other blocks or another budget: the saved selection and moments cannot load.
BLOCK_SETTINGS = tuple(SETTINGS[name].field for name in ("sparsity", "block_size", "include_embeddings", "norms"))
_CHUNK = 1 << 24
# A block setting left at its `auto` default resumes with the checkpoint's value (a run saved before `auto` became the
# default, or under another engine, keeps its blocks) instead of being refused as a change.
AUTO_VALUES = {SETTINGS["include_embeddings"].field: EMBEDDINGS_AUTO}


def _checkpoint_step(name: str) -> int | None:
    prefix = "checkpoint-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def is_complete(path: str) -> bool:
    """Whether the checkpoint's save finished: its ``trainer_state.json`` (written last) is there and whole."""
    try:
        with open(os.path.join(path, COMPLETION_MARKER), encoding="utf-8") as handle:
            return isinstance(json.load(handle), dict)
    except (OSError, ValueError):
        return False


def checkpoints_in(folder: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of the ``checkpoint-N`` folders in ``folder``, oldest first."""
    found = []
    for name in os.listdir(folder):
        step, path = _checkpoint_step(name), os.path.join(folder, name)
        if step is not None and os.path.isdir(path):
            found.append((step, path, is_complete(path)))
    return sorted(found)


INTERRUPTED = f"(no complete {COMPLETION_MARKER}: its save was interrupted)"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint_record(checkpoint: str, finetuning_args, optimizer=None) -> None:
    """``blockllm_checkpoint.json`` in ``checkpoint``: the SHA-256 of its optimizer and scheduler files and the
    ``blockllm_*`` settings that decide the blocks, written atomically. With the run's BlockLLM ``optimizer``, a
    setting left at ``auto`` is recorded as what it resolved to (so that a resume naming that value by hand is the
    same setting, and one left at ``auto`` under another engine adopts it)."""
    checksums = {name: _sha256(path) for name in CHECKSUMMED if os.path.isfile(path := os.path.join(checkpoint, name))}
    settings = {name: getattr(finetuning_args, name) for name in BLOCK_SETTINGS}
    embeddings = SETTINGS["include_embeddings"].field
    if optimizer is not None and settings[embeddings] == EMBEDDINGS_AUTO:
        settings[embeddings] = bool(optimizer.include_embeddings)
    write_json(os.path.join(checkpoint, RECORD), {"sha256": checksums, "settings": settings})


def _safetensors_damage(path: str) -> str | None:
    """Why a safetensors file is not whole (its header promises more bytes than the file holds), or None."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size)) if 8 + header_size <= size else None
    except (OSError, ValueError, struct.error):
        header = None
    if not isinstance(header, dict):
        return "is not a readable safetensors file (truncated or damaged)"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return None if 8 + header_size + end <= size else "is truncated (shorter than its header says)"


def _damage(path: str) -> str | None:
    """Why a file a resume reads cannot be read whole, or None: empty, or not a complete archive / safetensors."""
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    if path.endswith(".safetensors"):
        return _safetensors_damage(path)
    if path.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):  # torch.save writes zip archives
        return "is truncated or damaged (not a complete torch.save archive)"
    return None


def _state_files(checkpoint: str) -> list[str]:
    """The files a resume reads that are present (the missing ones: ``hf/serialization.py``)."""
    present = [
        os.path.join(checkpoint, name) for name in CHECKSUMMED if os.path.isfile(os.path.join(checkpoint, name))
    ]
    present += sorted(glob.glob(os.path.join(checkpoint, "rng_state*.pth")))
    present += sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))
    return present


def _older_complete(checkpoint: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(checkpoint))
    step = _checkpoint_step(os.path.basename(os.path.normpath(checkpoint)))
    older = [path for found, path, done in checkpoints_in(parent) if done and step is not None and found < step]
    return older[-1] if older else None


def check_resumable(checkpoint: str, training_args, finetuning_args=None, logger=None) -> None:
    """Refuses a checkpoint that BlockLLM cannot resume from exactly, naming the file or the field (see above); a
    block setting left at ``auto`` (:data:`AUTO_VALUES`) takes the checkpoint's value, said in the log."""
    older = _older_complete(checkpoint)
    elsewhere = f"resume from {older}, or " if older else ""
    restart = f"`model_name_or_path: {checkpoint}`, another `output_dir`, no `resume_from_checkpoint`"
    check_state_files(checkpoint, engine_of(training_args).deepspeed, restart, elsewhere)
    for path in _state_files(checkpoint):
        problem = _damage(path)
        if problem:
            raise ValueError(
                f"Cannot resume BlockLLM from {checkpoint}: {os.path.basename(path)} {problem}; {elsewhere}start "
                "afresh (`overwrite_output_dir: true`)."
            )
    record_path = os.path.join(checkpoint, RECORD)
    if not os.path.isfile(record_path):
        return  # saved before checksums were written: the optimizer's own checks at load remain
    with open(record_path, encoding="utf-8") as handle:
        record = json.load(handle)
    for name, expected in record.get("sha256", {}).items():
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path) and _sha256(path) != expected:
            raise ValueError(
                f"Cannot resume BlockLLM from {checkpoint}: {name} does not match the checksum saved with it in "
                f"{RECORD} (the file changed after it was saved: a damaged disk, a copy cut short, an edit); "
                f"{elsewhere}start afresh (`overwrite_output_dir: true`)."
            )
    if finetuning_args is None:
        return
    for name, saved in record.get("settings", {}).items():
        given = getattr(finetuning_args, name, saved)
        if name in AUTO_VALUES and saved == AUTO_VALUES[name]:
            continue  # recorded before records held the resolved value: the optimizer's load check names the field
        if name in AUTO_VALUES and given == AUTO_VALUES[name]:  # the record's value is not `auto` (above)
            setattr(finetuning_args, name, saved)
            if logger is not None:
                logger.info_rank0(adopted_setting(name, given, checkpoint, saved))
            continue
        if given != saved:
            raise ValueError(
                f"`{name}: {given}` differs from the checkpoint's `{name}: {saved}` ({checkpoint}): BlockLLM's saved "
                f"selection and Adam moments belong to the checkpoint's blocks; set `{name}: {saved}` to resume, or "
                f"start a new run from its weights (`model_name_or_path: {checkpoint}`, another `output_dir`)."
            )


def check_resume_checkpoint(training_args, logger=None, finetuning_args=None) -> None:
    """A checkpoint whose save was interrupted (a killed process) is never resumed from, and the one resumed from
    must let BlockLLM resume exactly (:func:`check_resumable`).

    The Trainer writes a checkpoint's files in place and ``trainer_state.json`` last, so a process killed while saving
    leaves ``checkpoint-N`` without it (or with half of it), next to the intact previous checkpoint. Resuming from the
    broken one fails late (or, for the model-only files, silently loads a half-written optimizer state). So: an
    explicit ``resume_from_checkpoint`` naming an incomplete checkpoint is refused with the previous complete one
    named; and when LLaMA-Factory would pick up the last checkpoint of ``output_dir`` by itself, the last *complete*
    one is chosen.
    """
    explicit = training_args.resume_from_checkpoint
    if explicit:
        is_checkpoint = _checkpoint_step(os.path.basename(os.path.normpath(explicit))) is not None
        if is_checkpoint and os.path.isdir(explicit) and not is_complete(explicit):
            parent = os.path.dirname(os.path.abspath(explicit))
            complete = [path for _, path, done in checkpoints_in(parent) if done]
            hint = f"resume from {complete[-1]}" if complete else "no complete checkpoint is next to it"
            raise ValueError(
                f"`resume_from_checkpoint: {explicit}` is an incomplete checkpoint {INTERRUPTED}; {hint}."
            )
        if os.path.isdir(explicit):
            check_resumable(explicit, training_args, finetuning_args, logger)
        return
    output_dir = training_args.output_dir
    if not (training_args.do_train and os.path.isdir(output_dir)) or getattr(
        training_args, "overwrite_output_dir", False
    ):
        return
    found = checkpoints_in(output_dir)
    if not found:
        return  # nothing to resume
    if found[-1][2]:  # the last checkpoint is complete: LLaMA-Factory's own choice is right
        check_resumable(found[-1][1], training_args, finetuning_args, logger)
        return
    complete = [path for _, path, done in found if done]
    if not complete:
        raise ValueError(
            f"{found[-1][1]} is an incomplete checkpoint {INTERRUPTED} and `output_dir` holds no complete one; delete "
            "it, or set "
            "`overwrite_output_dir: true` to start afresh."
        )
    check_resumable(complete[-1], training_args, finetuning_args, logger)
    if logger is not None:
        logger.warning_rank0(f"{found[-1][1]} is incomplete {INTERRUPTED}; resuming from {complete[-1]} instead.")
    training_args.resume_from_checkpoint = complete[-1]

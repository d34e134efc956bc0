"""Which checkpoint a ``finetuning_type: blockllm`` run resumes from: never one whose save was interrupted.

Called at parse time from :func:`.parser.check_training_setup` (for every stage but rm, which LLaMA-Factory never
resumes).
"""

import os

COMPLETION_MARKER = "trainer_state.json"  # the Trainer writes it last when it saves a checkpoint


def _checkpoint_step(name: str) -> int | None:
    prefix = "checkpoint-"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def checkpoints_in(folder: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of the ``checkpoint-N`` folders in ``folder``, oldest first."""
    found = []
    for name in os.listdir(folder):
        step, path = _checkpoint_step(name), os.path.join(folder, name)
        if step is not None and os.path.isdir(path):
            found.append((step, path, os.path.isfile(os.path.join(path, COMPLETION_MARKER))))
    return sorted(found)


def check_resume_checkpoint(training_args, logger=None) -> None:
    """A checkpoint whose save was interrupted (a killed process) is never resumed from.

    The Trainer writes a checkpoint's files in place and ``trainer_state.json`` last, so a process killed while saving
    leaves ``checkpoint-N`` without it, next to the intact previous checkpoint. Resuming from the broken one fails late
    (or, for the model-only files, silently loads a half-written optimizer state). So: an explicit
    ``resume_from_checkpoint`` naming an incomplete checkpoint is refused with the previous complete one named; and
    when LLaMA-Factory would pick up the last checkpoint of ``output_dir`` by itself, the last *complete* one is
    chosen.
    """
    explicit = training_args.resume_from_checkpoint
    if explicit:
        is_checkpoint = _checkpoint_step(os.path.basename(os.path.normpath(explicit))) is not None
        if is_checkpoint and os.path.isdir(explicit) and not os.path.isfile(os.path.join(explicit, COMPLETION_MARKER)):
            parent = os.path.dirname(os.path.abspath(explicit))
            complete = [path for _, path, done in checkpoints_in(parent) if done]
            hint = f"resume from {complete[-1]}" if complete else "no complete checkpoint is next to it"
            raise ValueError(
                f"`resume_from_checkpoint: {explicit}` is an incomplete checkpoint (no {COMPLETION_MARKER}: its save "
                f"was interrupted); {hint}."
            )
        return
    output_dir = training_args.output_dir
    if not (training_args.do_train and os.path.isdir(output_dir)) or getattr(
        training_args, "overwrite_output_dir", False
    ):
        return
    found = checkpoints_in(output_dir)
    if not found or found[-1][2]:
        return  # nothing to resume, or the last checkpoint is complete: LLaMA-Factory's own choice is right
    complete = [path for _, path, done in found if done]
    if not complete:
        raise ValueError(
            f"{found[-1][1]} is an incomplete checkpoint (no {COMPLETION_MARKER}: its save was interrupted) and "
            "`output_dir` holds no complete one; delete it, or set `overwrite_output_dir: true` to start afresh."
        )
    if logger is not None:
        logger.warning_rank0(
            f"{found[-1][1]} is incomplete (no {COMPLETION_MARKER}: its save was interrupted); resuming from "
            f"{complete[-1]} instead."
        )
    training_args.resume_from_checkpoint = complete[-1]

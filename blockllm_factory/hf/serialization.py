"""Loading a Trainer checkpoint's optimizer state, for BlockLLM runs of both fronts.

* Under DDP (registered by :func:`.engine.check_ddp`, which both fronts call when their arguments are checked, once per
  process): with more than one process the Trainer loads the optimizer state with ``map_location=args.device``, which
  on CPU is ``cpu:0``; torch only knows the location ``cpu`` and fails with "don't know how to restore data location
  of torch.storage.UntypedStorage (tagged with cpu:0)", so no multi-process CPU run could resume (with any optimizer:
  the limitation is transformers' and torch's, not BlockLLM's). CPU storages need no move: the location is accepted as
  it is. (GPU runs load onto ``cuda:N`` and never reach this; DeepSpeed loads its own checkpoints.)
* :func:`check_state_files`: the Trainer skips, without a word, an ``optimizer.pt`` or ``scheduler.pt`` that a
  checkpoint lacks (one saved with ``save_only_model``), so BlockLLM would start its selection, its moments and the
  schedule afresh; the resume is refused instead (LLaMA-Factory's front at parse time, ``patches/checkpoints.py``;
  the Trainer front when the Trainer loads them).
* :func:`saved_include_embeddings`: whether a checkpoint's BlockLLM state trains the embeddings and the head, for the
  Trainer front's resume under ``blockllm_include_embeddings: auto`` (its optimizer is created before the state loads).
"""

import glob
import os

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
_registered = False


def _restore_on_indexed_cpu(storage, location: str):
    return storage if location.startswith("cpu:") else None


def allow_loading_on_indexed_cpu() -> None:
    """Lets ``torch.load(..., map_location=torch.device("cpu", 0))`` work, for resuming DDP runs on CPU."""
    global _registered
    if _registered:
        return
    import torch.serialization

    torch.serialization.register_package(30, lambda storage: None, _restore_on_indexed_cpu)
    _registered = True


def missing_state_files(checkpoint: str, deepspeed: bool) -> list[str]:
    """The optimizer and schedule files a resume from ``checkpoint`` reads that it lacks."""
    # Under DeepSpeed its engine holds the optimizer states (and a scheduler of its config, when it has one).
    required = [] if deepspeed else [OPTIMIZER_FILE, SCHEDULER_FILE]
    missing = [name for name in required if not os.path.isfile(os.path.join(checkpoint, name))]
    if deepspeed and not glob.glob(os.path.join(checkpoint, "global_step*")):
        missing.append("global_step*/ (DeepSpeed's optimizer states)")
    return missing


def saved_include_embeddings(checkpoint: str) -> bool | None:
    """Whether the BlockLLM run state in ``checkpoint``'s optimizer file has the embeddings and the head among its
    blocks; None where there is no such file or no BlockLLM state in it (DeepSpeed's checkpoints, another optimizer's,
    an unreadable file: the Trainer's own load then says what is wrong)."""
    import pickle

    import torch

    from blockllm_factory.optim.run_state import RUN_STATE_KEY
    from blockllm_factory.optim.selection import is_embedding_name

    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        return None
    try:  # mmap: only the run state's few entries are read, not the moments
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return None
    run = state.get(RUN_STATE_KEY) if isinstance(state, dict) else None
    if not isinstance(run, dict) or not isinstance(run.get("block_names"), list):
        return None
    return any(is_embedding_name(name.partition("[")[0]) for name in run["block_names"])


def adopted_setting(field: str, given, checkpoint: str, saved) -> str:
    """The log line of a setting left at ``given`` (its ``auto``) that takes the resumed checkpoint's value, the same
    on both fronts."""
    return f"`{field}: {given}` resumes {checkpoint} with the checkpoint's `{field}: {saved}`."


def check_state_files(checkpoint: str, deepspeed: bool, restart: str, elsewhere: str = "") -> None:
    """Refuses a resume from ``checkpoint`` that would silently restart BlockLLM, naming the missing files;
    ``restart`` says how the front starts a new run from its weights, ``elsewhere`` names a better checkpoint."""
    missing = missing_state_files(checkpoint, deepspeed)
    if missing:
        raise ValueError(
            f"Cannot resume BlockLLM from {checkpoint}: it has no {' and no '.join(missing)} (it was saved with "
            "`save_only_model: true`, or the file was deleted), so BlockLLM's selection, its Adam moments and the "
            f"learning-rate schedule would silently start afresh; {elsewhere}start a new run from its weights "
            f"({restart})."
        )

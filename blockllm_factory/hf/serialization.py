"""A process-wide addition to ``torch.serialization``, registered only for BlockLLM runs under DDP (both fronts).

With more than one process the Trainer loads the optimizer state with ``map_location=args.device``, which on CPU is
``cpu:0``; torch only knows the location ``cpu`` and fails with "don't know how to restore data location of
torch.storage.UntypedStorage (tagged with cpu:0)", so no multi-process CPU run could resume (with any optimizer: the
limitation is transformers' and torch's, not BlockLLM's). CPU storages need no move: the location is accepted as it
is. (GPU runs load onto ``cuda:N`` and never reach this; DeepSpeed loads its own checkpoints.) Registered from
:func:`.engine.check_ddp`, which both fronts call when their arguments are checked, once per process.
"""

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

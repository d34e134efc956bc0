"""BlockLLM's run state: everything a checkpoint holds besides the per-parameter tensors, in one dataclass.

The fields below are the one list of what is saved: :meth:`RunState.to_dict` writes each under its key (a field's
``key`` metadata, else its name), :meth:`RunState.load_dict` reads each back, and a checkpoint that lacks a field
without a default written by older versions (``optional``) is refused naming the key. Fields marked ``identity``
describe the optimizer rather than the run (its blocks, its budget, its parameters' shapes): they are written so that a
load can refuse a checkpoint of another model or sparsity, and are compared, never loaded.
"""

import dataclasses
from collections import deque
from typing import Any

import torch

from .selection import is_embedding_name

RUN_STATE_KEY = "blockllm"  # the state_dict entry that holds the run state

_OPTIONAL = {"optional": True}  # absent from checkpoints of version 0.1.0: loaded as the field's default
_IDENTITY = {"identity": True}


@dataclasses.dataclass(eq=False)
class RunState:
    """What BlockLLM decides from and has decided: selection, probes, norm table, losses, counters, generator."""

    # The identity of the optimizer the state belongs to (compared on load).
    block_names: list[str] = dataclasses.field(metadata=_IDENTITY)
    budget: int = dataclasses.field(metadata=_IDENTITY)
    shapes: dict[str, list[int]] = dataclasses.field(metadata={**_IDENTITY, **_OPTIONAL})
    # The run.
    generator: torch.Generator = dataclasses.field(metadata={"key": "rng_state"})  # samples the probed blocks
    losses: deque[float] = dataclasses.field(metadata={})  # the loss rule's window (maxlen: patience)
    visits: dict[str, int] = dataclasses.field(metadata={})  # selections each block was in
    selected: dict[str, int] = dataclasses.field(default_factory=dict)  # block name -> coordinates kept
    # Blocks whose norm the next backward measures (with all blocks of their tensor).
    probed: list[str] = dataclasses.field(default_factory=list)
    reselect_after_probe: bool = False  # probe="exact": the loss rule fired, every block is being measured
    norms: dict[str, float] = dataclasses.field(default_factory=dict)  # the last measured norm of each block
    step: int = 0
    reselections: int = 0
    skipped_steps: int = 0
    steps_without_loss: int = dataclasses.field(default=0, metadata=_OPTIONAL)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one entry per (re)selection

    @classmethod
    def fresh(cls, block_names: list[str], budget: int, shapes: dict[str, list[int]], patience: int, seed: int):
        """The state of a run that has not started: no selection, every visit count 0."""
        return cls(
            block_names=list(block_names),
            budget=budget,
            shapes=shapes,
            generator=torch.Generator().manual_seed(seed),
            losses=deque(maxlen=patience),
            visits=dict.fromkeys(block_names, 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """The run state as a checkpoint holds it: plain containers, copies (the dict outlives this step)."""
        return {_key(spec): _saved(getattr(self, spec.name)) for spec in dataclasses.fields(self)}

    def check_dict(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """``saved`` if it is a run state this optimizer can load, else a ``ValueError`` saying why."""
        if saved is None:
            raise ValueError(f"Invalid state_dict: it has no {RUN_STATE_KEY!r} entry (not saved by BlockLLM)")
        missing = [
            _key(spec)
            for spec in dataclasses.fields(self)
            if _key(spec) not in saved and not spec.metadata.get("optional")
        ]
        if missing:
            raise ValueError(
                f"Invalid state_dict: its {RUN_STATE_KEY!r} entry lacks {', '.join(map(repr, missing))} (damaged, or "
                "not saved by this version of blockllm-factory)"
            )
        if saved["block_names"] != self.block_names or saved["budget"] != self.budget:
            _check_same_embeddings(saved["block_names"], self.block_names)
            raise ValueError(
                "Invalid state_dict: it was saved for other blocks or another sparsity "
                f"(saved budget {saved['budget']}, this optimizer {self.budget})"
            )
        for name, shape in saved.get("shapes", {}).items():
            if list(shape) != list(self.shapes[name]):
                raise ValueError(
                    f"Invalid state_dict: it was saved for another model ({name} had shape {tuple(shape)}, here "
                    f"{tuple(self.shapes[name])})"
                )
        return saved

    def load_dict(self, saved: dict[str, Any]) -> None:
        """Restores every run field from ``saved`` (checked by :meth:`check_dict`); identity fields stay."""
        for spec in dataclasses.fields(self):
            if spec.metadata.get("identity"):
                continue
            current = getattr(self, spec.name)
            value = saved[_key(spec)] if _key(spec) in saved else spec.default  # only optional ones may lack
            if isinstance(current, torch.Generator):
                # A CPU generator: accelerate moves a state dict to the model's device before loading it.
                current.set_state(value.to("cpu"))
            elif isinstance(current, deque):
                setattr(self, spec.name, deque(value, maxlen=current.maxlen))
            else:
                setattr(self, spec.name, _saved(value))


def _tensors(block_names: list[str]) -> set[str]:
    """The parameter names of blocks named ``name`` (whole tensors) or ``name[first:stop]`` (row groups)."""
    return {name.partition("[")[0] for name in block_names}


def _blocks_of(block_names: list[str], tensors: set[str]) -> list[str]:
    return [name for name in block_names if name.partition("[")[0] in tensors]


def _check_same_embeddings(saved_blocks: list[str], blocks: list[str]) -> None:
    """Blocks that differ by the embeddings and the head alone: a checkpoint of the other ``include_embeddings``
    (e.g. saved before ``auto`` became the Trainer front's default), refused naming the setting that resumes it."""
    saved, here = _tensors(saved_blocks), _tensors(blocks)
    extra = sorted(saved ^ here)
    if not extra or not all(is_embedding_name(name) for name in extra) or not (saved < here or saved > here):
        return
    shared = saved & here
    if _blocks_of(saved_blocks, shared) != _blocks_of(blocks, shared):
        return  # other blocks besides: the generic message
    with_them = saved > here  # the checkpoint trained them, this optimizer leaves them frozen
    saved_as, here_as = ("among its blocks", "frozen") if with_them else ("frozen", "among its blocks")
    raise ValueError(
        f"Invalid state_dict: it was saved with the embeddings and the head {saved_as} ({', '.join(extra)}), this "
        f"optimizer has them {here_as}; set "
        f"include_embeddings={with_them} (LLaMA-Factory: `blockllm_include_embeddings: {str(with_them).lower()}`) to "
        "resume it"
    )


def _key(spec: dataclasses.Field) -> str:
    return spec.metadata.get("key", spec.name)


def _saved(value: Any) -> Any:
    """A copy of a field's value in plain containers (a generator as its state)."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, dict):
        return {key: list(item) if isinstance(item, list | tuple) else item for key, item in value.items()}
    if isinstance(value, list | deque):
        return [dict(item) if isinstance(item, dict) else item for item in value]
    return value

"""Measurement inside ``llamafactory-cli train`` for ``blockllm-factory bench``; surface ``llamafactory.train.tuner``.

Inert unless the harness sets ``BLOCKLLM_FACTORY_BENCH_OUT`` to a JSON path: then :func:`apply` wraps
``_training_function`` so that every training run gets one more callback, :class:`BenchMetricsCallback`, which measures
the live tensors and writes what it saw to that path (atomically, on rank 0, at the end of training and after each
evaluation).

What is measured, and when:

- bytes by category, from the tensors themselves (storages counted once): parameters (the model's), gradients
  (``.grad`` of model parameters and of optimizer-held copies), optimizer state (every tensor reachable from
  ``optimizer.state`` along the wrapper chain, GaLore's projectors included), master weights (optimizer-held
  parameters that are not the model's, e.g. BAdam's fp32 copies, and optimizer-state entries whose key names a master
  copy, e.g. BlockLLM's). Samples are taken after each gradient accumulation of a trainable parameter, and just before
  and after every ``step()`` of every optimizer in the chain. Each category keeps its own peak;
  ``peak_tracked_bytes`` is the peak of their sum at one sample.
- peak memory: ``torch.cuda.max_memory_allocated`` since the start of training on a GPU; on CPU the process's peak RSS
  (``ru_maxrss``, which includes the Python runtime and the libraries). Both the source and the peak RSS are recorded.
- every byte: the peak of all live tensor storages on the training device (``peak_storage_bytes``, on CPU and GPU
  alike: what ``max_memory_allocated`` sees, without the allocator's rounding), its composition (weights, gradients,
  optimizer state, masters, activations saved for backward, the loss path from the output embedding on, temporaries,
  other), the bytes outside the four tracked categories at that moment (``untracked_bytes``), and where it happened
  (``peak_phase``: forward, loss, backward, optimizer or other; ``peak_step``: 1 for the first step). See
  :mod:`.storages`.
- trainable parameters: the coordinates the optimizer updates in a step (``optimizer.selection["coordinates"]`` where
  the optimizer reports a selection, as BlockLLM does; otherwise the parameters with ``requires_grad``), the largest
  value seen after an optimizer step.
- what changed: for every parameter tensor (tied weights once, under all their names), whether its values at the end
  of training differ from those at the start, by two integer checksums of its bits taken at both ends (no copy of the
  weights is kept). The report derives from it what a method trains (embeddings, head, norms, layers).
- gradients also include the ``.grad`` of tensors an optimizer holds in its ``param_groups`` that are not the model's
  (a compact-gradient carrier, BAdam's fp32 copies); such a tensor's own storage counts as a master weight (a few
  bytes for a carrier whose data is an expanded scalar).
- with several processes (DDP, DeepSpeed): every rank measures its own figures and writes them beside the metrics
  (``metrics.rank<N>.json``, rank 0 also writes the metrics file as before), with the bytes it sent in collectives at
  each step, by operator (:mod:`.collectives`: a dispatch mode that sees every ``c10d`` collective, DDP's C++ reducer
  included), and the engine of the run as BlockLLM decides it (``engine``: kind, processes, ZeRO stage).
- a run that raises (e.g. out of memory) still writes what was measured until then, with the error.
- step times (step begin to step end, device synchronised), tokens per step (``num_input_tokens_seen``), the logged
  training losses and the evaluation losses.

Switches, read from the environment (a suite sets them under ``env:``):

- ``BLOCKLLM_FACTORY_BENCH_GRADIENT_SAMPLES=0``: no sample after each gradient accumulation, only around every
  optimizer step. A sample walks every parameter in Python; taken after each of a model's hundreds of gradients it
  delays the kernel launches of the backward pass on a GPU, and more so for methods that train more tensors, so timed
  suites turn it off. The gradient peak is then the one seen at the optimizer step, which is where a method that
  keeps its gradients until the step peaks; the GPU's peak comes from the allocator either way.
- ``BLOCKLLM_FACTORY_BENCH_EXACT_MATCH=1``: after each evaluation, the share of eval examples whose answer the model
  gets exactly right under teacher forcing (every label token the argmax given the true prefix, which is what greedy
  decoding would reproduce), one more forward pass over the eval set; a task metric beside the eval loss for SFT.
- ``BLOCKLLM_FACTORY_BENCH_PROFILE=N``: the last ``N`` steps of the run are profiled with ``torch.profiler`` and the
  table of operators by device time (by CPU time without a GPU) is written beside the metrics as ``profile.txt``.
  Profiled steps are left out of the step times.
- ``BLOCKLLM_FACTORY_BENCH_STORAGES=0``: no storage tracking (``peak_storage_bytes`` and its composition are then
  null). The tracking sees every operator from Python, which costs time per operator; on a GPU that delays kernel
  launches, so a suite that times steps there may turn it off.
- ``BLOCKLLM_FACTORY_BENCH_MEMORY_SNAPSHOT=N`` (CUDA only): step ``N`` (1: the first) is recorded with
  ``torch.cuda.memory._record_memory_history`` and saved beside the metrics as ``memory_snapshot.pickle``, for
  https://pytorch.org/memory_viz. Ignored without a GPU (``memory_snapshot`` then says so).
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers import TrainerCallback

from blockllm_factory._files import BENCH_OUT_ENV, rank_path, write_json, write_text

from ._version import check_llamafactory_version
from .collectives import SUMMARY_KEYS as COLLECTIVE_KEYS
from .collectives import CollectiveCounter
from .storages import SUMMARY_KEYS, StorageTracker

GRADIENT_SAMPLES_ENV = "BLOCKLLM_FACTORY_BENCH_GRADIENT_SAMPLES"
PROFILE_ENV = "BLOCKLLM_FACTORY_BENCH_PROFILE"
EXACT_MATCH_ENV = "BLOCKLLM_FACTORY_BENCH_EXACT_MATCH"
IGNORE_INDEX = -100  # labels of prompt and padding tokens (LLaMA-Factory's and transformers' value)
PROFILE_FILE = "profile.txt"
STORAGES_ENV = "BLOCKLLM_FACTORY_BENCH_STORAGES"
SNAPSHOT_ENV = "BLOCKLLM_FACTORY_BENCH_MEMORY_SNAPSHOT"
SNAPSHOT_FILE = "memory_snapshot.pickle"
_SNAPSHOT_ENTRIES = 1_000_000
_PROFILE_ROWS = 40
SCHEMA = 1
_PATCHED_FLAG = "_blockllm_factory_bench_metrics"
_MAX_WALK_DEPTH = 6
_CHECKSUM_CHUNK = 1 << 22  # elements per pass: bounds the int64 temporaries of a checksum to a few tens of MB
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply(module: Any) -> None:
    """Adds :class:`BenchMetricsCallback` to every training run of ``module`` when the harness asked for it."""
    out_path = os.environ.get(BENCH_OUT_ENV)
    if not out_path or getattr(module, _PATCHED_FLAG, False):
        return
    check_llamafactory_version()
    original = module._training_function

    @functools.wraps(original)
    def _training_function(config: dict[str, Any]) -> None:
        callbacks = config.get("callbacks")
        if callbacks is None:
            callbacks = config["callbacks"] = []
        callback = BenchMetricsCallback(
            out_path,
            sample_gradients=os.environ.get(GRADIENT_SAMPLES_ENV, "1") != "0",
            profile_steps=int(os.environ.get(PROFILE_ENV, "0") or 0),
            track_storages=os.environ.get(STORAGES_ENV, "1") != "0",
            snapshot_step=int(os.environ.get(SNAPSHOT_ENV, "0") or 0),
            exact_match=os.environ.get(EXACT_MATCH_ENV, "0") == "1",
        )
        callbacks.append(callback)
        try:
            return original(config)
        except BaseException as error:  # e.g. out of memory: keep the figures measured so far, then fail as before
            callback.record_failure(error)
            raise

    module._training_function = _training_function
    if hasattr(module, "get_train_args"):  # LLaMA-Factory's tuner (listed in _surfaces.py); not test doubles
        module.get_train_args = _connecting_deepspeed(module.get_train_args)
    setattr(module, _PATCHED_FLAG, True)


def _connecting_deepspeed(get_train_args: Any) -> Any:
    """For every method's DeepSpeed run, registers the process group with DeepSpeed once the arguments are parsed,
    as BlockLLM's parse-time check does for its own runs: on CPU nothing else does before ZeRO-3's ``zero.Init``, which
    would take the world size for 1 and refuse the batch settings (docs/distributed.md), so BAdam and full fine-tuning
    under ZeRO-3 could not be measured beside BlockLLM on CPU. On a GPU the Trainer's arguments did it already."""

    @functools.wraps(get_train_args)
    def parsed_and_connected(*args: Any, **kwargs: Any) -> Any:
        parsed = get_train_args(*args, **kwargs)
        if getattr(parsed[2], "deepspeed", None):
            from blockllm_factory.hf.deepspeed_config import connect_deepspeed_comm

            connect_deepspeed_comm()
        return parsed

    return parsed_and_connected


class _Storages:
    """Bytes of distinct storages: a storage shared by several tensors (tied weights, views) is counted once."""

    def __init__(
        self, exclude: set[int] | None = None, tracker: StorageTracker | None = None, category: str = ""
    ) -> None:
        self.seen: set[int] = set(exclude or ())
        self.bytes = 0
        self.tracker = tracker  # told what each storage is, for the composition at the all-storage peak
        self.category = category

    def add(self, tensor: Any) -> None:
        if self.tracker is not None:
            self.tracker.tag(tensor, self.category)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.seen:  # 0: empty or meta storage (e.g. a ZeRO-3 partitioned parameter)
            return
        self.seen.add(key)
        self.bytes += storage.nbytes()


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and everything it wraps (accelerate's wrapper, BAdam's base optimizer, ...), outermost first."""
    chain: list[Any] = []
    current = optimizer
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = getattr(current, "optimizer", None) or getattr(current, "base_optimizer", None)
    return chain


def _checksum(tensor: Any) -> tuple[int, int] | None:
    """The sum and the sum of squares (wrapping int64) of a tensor's bits: a changed value changes them, except by a
    coincidence too unlikely to matter. None for an empty, meta or partitioned (ZeRO-3) tensor."""
    if tensor.numel() == 0 or tensor.device.type == "meta" or tensor.untyped_storage().data_ptr() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    view = _BIT_VIEWS.get(flat.element_size())
    if view is None:
        return None
    bits = flat.view(view)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    squares = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
        chunk = bits[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        total += chunk.sum()
        squares += (chunk * chunk).sum()
    return int(total), int(squares)


def exact_match(model: Any, batches: Iterable[Mapping[str, Any]]) -> float | None:
    """Share of the examples whose every label token is the model's most likely next token given the true prefix.

    Teacher-forced, one forward pass per batch; the same as greedy decoding reproducing the whole answer and its end
    token (the labels hold both), without generating. Examples without a label token are not counted."""
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        with torch.no_grad():
            for batch in batches:
                device = next(model.parameters()).device
                inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}
                gold = batch["labels"].to(device)[:, 1:]
                predicted = model(**inputs).logits[:, :-1].argmax(dim=-1)
                scored = gold != IGNORE_INDEX
                right = ((predicted == gold) | ~scored).all(dim=1)
                counted = scored.any(dim=1)
                hits += int((right & counted).sum())
                total += int(counted.sum())
    finally:
        model.train(was_training)
    return hits / total if total else None


def _state_of(optimizer: Any) -> Mapping | None:
    try:
        state = optimizer.state
    except Exception:  # BAdam's BlockOptimizer has no state of its own; accelerate's wrapper forwards
        return None
    return state if isinstance(state, Mapping) else None


class BenchMetricsCallback(TrainerCallback):
    """Measures one training run for the comparison harness and writes the figures to ``out_path``."""

    def __init__(
        self,
        out_path: str,
        sample_gradients: bool = True,
        profile_steps: int = 0,
        track_storages: bool = True,
        snapshot_step: int = 0,
        exact_match: bool = False,
    ) -> None:
        self.out_path = out_path
        self.exact_match = exact_match
        self.exact_match_curve: list[list[float]] = []
        self.track_storages = track_storages
        self.storages: StorageTracker | None = None
        self.snapshot_step = max(0, snapshot_step)
        self.memory_snapshot: str | None = None
        self._recording = False
        self._optimizer_depth = 0
        self.sample_gradients = sample_gradients
        self.profile_steps = max(0, profile_steps)
        self._profiler: Any = None
        self.profiled_steps = 0
        self.chain: list[Any] = []
        self.params: list[Any] = []
        self.param_names: dict[int, list[str]] = {}  # id(parameter) -> its names (several for tied weights)
        self.param_ptrs: set[int] = set()
        self.held: list[Any] = []  # optimizer-held tensors that are not the model's, as of the last full sample
        self.initial_checksums: dict[int, tuple[int, int] | None] = {}
        self.changed: dict[int, bool | None] = {}
        self.parameter_dtypes: dict[str, int] = {}
        self.sparsity: float | None = None
        self.error: str | None = None
        self._started = False
        self._final_peak: int | None = None
        self.hooked: set[int] = set()
        self.handles: list[Any] = []
        self.device: Any = None
        self.peaks = {"parameter": 0, "gradient": 0, "optimizer_state": 0, "master_weight": 0, "tracked": 0}
        self.last = {"parameter": 0, "optimizer_state": 0, "master_weight": 0}
        self.trainable_parameters = 0
        self.eligible_parameters: int | None = None
        self.step_times: list[float] = []
        self.step_cpu_times: list[float] = []
        self.load_average: list[float] = []
        self.step_tokens: list[int] = []
        self.loss_curve: list[list[float]] = []
        self.eval_curve: list[list[float]] = []
        self._step_start: float | None = None
        self._step_cpu_start = 0.0
        self._tokens_at_start = 0
        self._world_zero = True
        self._world_size = 1
        self._rank = 0
        self.engine: dict[str, Any] | None = None
        self.collectives: CollectiveCounter | None = None

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **_: Any):
        self._world_zero = bool(state.is_world_process_zero)
        self._world_size = int(getattr(args, "world_size", 1) or 1)
        self._rank = int(getattr(args, "process_index", 0) or 0)
        from blockllm_factory.hf.engine import engine_of

        decided = engine_of(args)  # the same decision BlockLLM's parts read, for any method's run
        self.engine = {"kind": decided.kind, "world_size": decided.world_size, "zero_stage": decided.zero_stage}
        self.params = list(model.parameters())
        for name, param in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(param), []).append(name)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in self.params}
        for param in self.params:
            self.parameter_dtypes[str(param.dtype).removeprefix("torch.")] = (
                self.parameter_dtypes.get(str(param.dtype).removeprefix("torch."), 0) + param.numel()
            )
        self.initial_checksums = {id(param): _checksum(param) for param in self.params}
        self.device = next((p.device for p in self.params if p.device.type != "meta"), torch.device("cpu"))
        self.chain = _optimizer_chain(optimizer)
        chain_ids = {id(item) for item in self.chain}
        for item in self.chain:
            eligible = getattr(item, "eligible_numel", None)
            if isinstance(eligible, int):
                self.eligible_parameters = eligible
                sparsity = getattr(item, "sparsity", None)
                self.sparsity = float(sparsity) if isinstance(sparsity, (int, float)) else None

        def before_step(opt: Any, *_args: Any, **_kwargs: Any) -> None:
            if id(opt) in chain_ids:
                self._optimizer_depth += 1
                self._phase("optimizer")
                self._sample_full()

        def after_step(opt: Any, *_args: Any, **_kwargs: Any) -> None:
            if id(opt) in chain_ids:
                self._sample_full()
                self._optimizer_depth = max(0, self._optimizer_depth - 1)
                if not self._optimizer_depth:
                    self._phase("other")

        self.handles += [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.load_average = [os.getloadavg()[0]]
        self._started = True
        if self._world_size > 1 and torch.distributed.is_initialized():
            # Entered before the storage tracker and left after it: dispatch modes nest.
            self.collectives = CollectiveCounter()
            self.collectives.start()
        if self.track_storages:
            self._start_storages(model)
        self._sample_full()

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any):
        # Blocks switch between steps (BAdam, BlockLLM): hook the parameters that became trainable.
        for param in self.params if self.sample_gradients else ():
            if param.requires_grad and id(param) not in self.hooked:
                self.hooked.add(id(param))
                self.handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))
        self._synchronize()
        if self.collectives is not None:
            self.collectives.begin_step(int(state.global_step))
        if self.storages is not None:
            self.storages.step = int(state.global_step)
            self._phase("other")
        if self.snapshot_step and state.global_step + 1 == self.snapshot_step:
            self._start_snapshot()
        if self.profile_steps and self._profiler is None and state.global_step >= state.max_steps - self.profile_steps:
            self._start_profiler()
        self._tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._step_cpu_start = time.process_time()
        self._step_start = time.perf_counter()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any):
        self._sample_full()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any):
        self._sample_full()
        self.trainable_parameters = max(self.trainable_parameters, self._count_trainable())

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any):
        if self.collectives is not None:
            self.collectives.end_step()
        if self._recording:
            self._save_snapshot()
        if self._step_start is None:
            return
        self._synchronize()
        if self._profiler is not None:  # a profiled step is slower: it is left out of the step times
            self.profiled_steps += 1
            self._step_start = None
            if state.global_step >= state.max_steps:
                self._stop_profiler()
            return
        self.step_times.append(time.perf_counter() - self._step_start)
        self.step_cpu_times.append(time.process_time() - self._step_cpu_start)
        self.step_tokens.append(int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._tokens_at_start)
        self._step_start = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any):
        if logs and "loss" in logs:
            self.loss_curve.append([int(state.global_step), float(logs["loss"])])

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, Any] | None = None,
        model: Any = None,
        eval_dataloader: Any = None,
        **_: Any,
    ):
        if metrics and "eval_loss" in metrics:
            self.eval_curve.append([int(state.global_step), float(metrics["eval_loss"])])
            if self.exact_match and model is not None and eval_dataloader is not None:
                score = exact_match(model, eval_dataloader)
                if score is not None:
                    self.exact_match_curve.append([int(state.global_step), score])
        self._write()

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any):
        self._stop_storages()
        self._stop_profiler()
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.load_average = self.load_average[:1] + [os.getloadavg()[0]]
        if self.device is not None and self.device.type == "cuda":
            self._final_peak = torch.cuda.max_memory_allocated(self.device)  # before the checksums' temporaries
        self.changed = {}
        for param in self.params:
            before, after = self.initial_checksums.get(id(param)), _checksum(param)
            self.changed[id(param)] = None if before is None or after is None else before != after
        self._write()

    def record_failure(self, error: BaseException) -> None:
        """Writes the figures measured until ``error`` ended the run, with the error (nothing before training)."""
        self.error = f"{type(error).__name__}: {str(error)[:500]}"
        self._stop_storages()
        if self._started:
            self._write()

    # ------------------------------------------------------------------ every storage, and a CUDA snapshot
    def _start_storages(self, model: Any) -> None:
        tracker = self.storages = StorageTracker(self.device.type)
        tracker.names = {key: names[0] for key, names in self.param_names.items()}
        for buffer in model.buffers():
            tracker.tag(buffer, "weights")

        def forward_begins(module: Any, *_: Any) -> None:
            self._phase("forward" if module.training and torch.is_grad_enabled() else "evaluation")

        def forward_ends(*_: Any) -> None:
            # the loss reduction and the backward pass follow (a loss computed outside the model counts there)
            self._phase("backward" if tracker.phase in ("forward", "loss") else "other")

        def loss_path_begins(*_: Any) -> None:
            if tracker.phase == "forward":
                self._phase("loss")

        self.handles += [model.register_forward_pre_hook(forward_begins), model.register_forward_hook(forward_ends)]
        get_output = getattr(model, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        if isinstance(head, torch.nn.Module):
            self.handles.append(head.register_forward_pre_hook(loss_path_begins))
        tracker.start()

    def _stop_storages(self) -> None:
        if self.storages is not None:
            self.storages.stop()
        if self.collectives is not None:
            self.collectives.stop()

    def _phase(self, phase: str) -> None:
        if self.storages is not None:
            self.storages.phase = phase

    def _start_snapshot(self) -> None:
        if self.device is None or self.device.type != "cuda":
            self.memory_snapshot = "not recorded: needs a CUDA device"
            return
        torch.cuda.memory._record_memory_history(max_entries=_SNAPSHOT_ENTRIES)
        self._recording = True

    def _save_snapshot(self) -> None:
        """Ends the recorded step: the snapshot is written beside the metrics (untested here: no GPU in CI)."""
        self._recording = False
        path = Path(self.out_path).parent / SNAPSHOT_FILE
        try:
            if self._world_zero:
                torch.cuda.memory._dump_snapshot(str(path))
                self.memory_snapshot = SNAPSHOT_FILE
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    # ------------------------------------------------------------------ profile
    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device is not None and self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, record_shapes=False)
        self._profiler.__enter__()

    def _stop_profiler(self) -> None:
        """Writes the operator table of the profiled steps to ``profile.txt`` beside the metrics."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        profiler.__exit__(None, None, None)
        if not self._world_zero:
            return
        on_gpu = self.device is not None and self.device.type == "cuda"
        sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=_PROFILE_ROWS)
        header = f"torch.profiler, {self.profiled_steps} training step(s) at the end of the run, sorted by {sort_by}\n"
        write_text(Path(self.out_path).parent / PROFILE_FILE, header + table + "\n")

    # ------------------------------------------------------------------ sampling
    def _synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _on_gradient(self, _param: Any) -> None:
        gradients = self._gradient_bytes(self.held)
        self._record(gradients=gradients, **self.last)

    def _gradient_bytes(self, extra: Iterable[Any] = ()) -> int:
        storages = _Storages(tracker=self.storages, category="gradients")
        for param in self.params:
            if param.grad is not None:
                storages.add(param.grad)
        for param in extra:
            if param.grad is not None:
                storages.add(param.grad)
        return storages.bytes

    def _sample_full(self) -> None:
        parameters = _Storages(tracker=self.storages, category="weights")
        for param in self.params:
            parameters.add(param)
            # Under DeepSpeed ZeRO-3 a parameter's storage is empty outside its module's forward and backward; what
            # the rank holds of it is its shard, ``ds_tensor`` (views into DeepSpeed's flat buffer of the trained
            # group's shards, or a tensor of its own).
            shard = getattr(param, "ds_tensor", None)
            if isinstance(shard, torch.Tensor):
                parameters.add(shard)
        weights = self.param_ptrs | parameters.seen  # the parameters' storages and the ZeRO-3 shards'
        masters = _Storages(exclude=weights, tracker=self.storages, category="masters")
        held: list[Any] = []  # optimizer-held parameters that are not the model's (fp32 master copies)
        for item in self.chain:
            for group in getattr(item, "param_groups", None) or ():
                for param in group.get("params", ()):
                    if hasattr(param, "untyped_storage") and param.untyped_storage().data_ptr() not in weights:
                        held.append(param)
                        masters.add(param)
        states = _Storages(exclude=weights | masters.seen, tracker=self.storages, category="optimizer_state")
        visited: set[int] = set()
        for item in self.chain:
            state = _state_of(item)
            if state is not None:
                self._walk_state(state, states, masters, visited, depth=0)
        self.held = held
        self.last = {"parameter": parameters.bytes, "optimizer_state": states.bytes, "master_weight": masters.bytes}
        self._record(gradients=self._gradient_bytes(held), **self.last)

    def _walk_state(self, value: Any, states: _Storages, masters: _Storages, visited: set[int], depth: int) -> None:
        if depth > _MAX_WALK_DEPTH or id(value) in visited:
            return
        if isinstance(value, torch.Tensor):
            states.add(value)
            return
        visited.add(id(value))
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and "master" in key.lower() and isinstance(item, torch.Tensor):
                    masters.add(item)
                    states.seen.add(item.untyped_storage().data_ptr())
                else:
                    self._walk_state(item, states, masters, visited, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                self._walk_state(item, states, masters, visited, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
            # e.g. GaLore keeps a projector object (with its orthogonal matrix) in the state of each parameter
            self._walk_state(vars(value), states, masters, visited, depth + 1)

    def _record(self, gradients: int, parameter: int, optimizer_state: int, master_weight: int) -> None:
        peaks = self.peaks
        peaks["parameter"] = max(peaks["parameter"], parameter)
        peaks["gradient"] = max(peaks["gradient"], gradients)
        peaks["optimizer_state"] = max(peaks["optimizer_state"], optimizer_state)
        peaks["master_weight"] = max(peaks["master_weight"], master_weight)
        peaks["tracked"] = max(peaks["tracked"], parameter + gradients + optimizer_state + master_weight)

    def _count_trainable(self) -> int:
        for item in reversed(self.chain):
            selection = getattr(item, "selection", None)
            if isinstance(selection, Mapping) and isinstance(selection.get("coordinates"), int):
                return int(selection["coordinates"])
        return self._count_parameters(p for p in self.params if p.requires_grad)

    @staticmethod
    def _count_parameters(params: Iterable[Any]) -> int:
        seen: set[int] = set()
        total = 0
        for param in params:
            # A ZeRO-3 parameter holds no storage outside forward and backward: its size is DeepSpeed's ds_numel.
            partitioned = hasattr(param, "ds_numel")
            # Tied weights share their data pointer; views into one flat buffer (DeepSpeed ZeRO-1/2) do not.
            key = id(param) if partitioned else (param.data_ptr(), param.numel())
            if key not in seen:  # tied weights count once
                seen.add(key)
                total += int(param.ds_numel) if partitioned else param.numel()
        return total

    # ------------------------------------------------------------------ output
    def payload(self) -> dict[str, Any]:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        on_gpu = self.device is not None and self.device.type == "cuda"
        if on_gpu:
            peak = self._final_peak if self._final_peak is not None else torch.cuda.max_memory_allocated(self.device)
            source = "cuda_max_memory_allocated"
            device_name = torch.cuda.get_device_name(self.device)
        else:
            peak, source, device_name = peak_rss, "cpu_peak_rss", "cpu"
        measured_steps = len(self.step_times)
        total_time = sum(self.step_times)
        return {
            "schema": SCHEMA,
            "device": str(self.device),
            "device_name": device_name,
            "world_size": self._world_size,
            "rank": self._rank,
            "engine": self.engine,
            "peak_memory_bytes": int(peak),
            "peak_memory_source": source,
            "peak_rss_bytes": int(peak_rss),
            "peak_tracked_bytes": self.peaks["tracked"],
            **self._storage_summary(),
            **(self.collectives.summary() if self.collectives is not None else dict.fromkeys(COLLECTIVE_KEYS)),
            "memory_snapshot": self.memory_snapshot,
            "parameter_bytes": self.peaks["parameter"],
            "gradient_bytes": self.peaks["gradient"],
            "optimizer_state_bytes": self.peaks["optimizer_state"],
            "master_weight_bytes": self.peaks["master_weight"],
            "trainable_parameters": self.trainable_parameters,
            "eligible_parameters": self.eligible_parameters,
            "sparsity": self.sparsity,
            "total_parameters": self._count_parameters(self.params),
            "parameter_dtypes": self.parameter_dtypes,
            # per parameter tensor: its names, size, and whether its values changed during training (None: unknown)
            "parameters": [
                {
                    "names": self.param_names.get(id(p), []),
                    "numel": int(getattr(p, "ds_numel", p.numel())),  # a ZeRO-3 parameter's own numel() is 0
                    "changed": self.changed.get(id(p)),
                }
                for p in self.params
            ]
            if self.changed
            else None,
            "error": self.error,
            # outermost first, e.g. "...AcceleratedOptimizer > badam.block_optim.BlockOptimizer > torch...AdamW"
            "optimizer": " > ".join(f"{type(item).__module__}.{type(item).__name__}" for item in self.chain) or None,
            "steps": measured_steps,
            "profiled_steps": self.profiled_steps,
            "gradient_samples": self.sample_gradients,
            "step_times_s": self.step_times,
            "step_time_s": statistics.median(self.step_times) if self.step_times else None,
            "step_cpu_time_s": statistics.median(self.step_cpu_times) if self.step_cpu_times else None,
            "load_average": self.load_average,
            "tokens": sum(self.step_tokens),
            "tokens_per_s": sum(self.step_tokens) / total_time if total_time > 0 and sum(self.step_tokens) else None,
            "loss_curve": self.loss_curve,
            "eval_curve": self.eval_curve,
            "exact_match_curve": self.exact_match_curve,
        }

    def _storage_summary(self) -> dict[str, Any]:
        if self.storages is None:
            return dict.fromkeys(SUMMARY_KEYS)
        return self.storages.summary()

    def _write(self) -> None:
        """Rank 0 writes ``out_path``; with several processes every rank also writes its own figures beside it
        (:func:`rank_path`), which the harness gathers into the run's per-rank report."""
        payload = self.payload()
        if self._world_size > 1:
            write_json(rank_path(self.out_path, self._rank), payload)
        if self._world_zero:
            write_json(Path(self.out_path), payload)

"""BlockLLM across processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, two processes each.

The first test drives torch's DDP directly (seconds). The others run the real ``llamafactory-cli train`` with
``FORCE_TORCHRUN=1 NPROC_PER_NODE=2`` on the tiny model of conftest.py; a ``sitecustomize.py`` put on ``PYTHONPATH``
(test-only instrumentation, outside the product) makes every rank write its selection record and weights when training
ends. They assert that both ranks made the same selections
and ended with bit-equal weights, that DDP, ZeRO-2 and ZeRO-3 trained the same way, and that a run resumed from a
checkpoint ends bit-identical to the unbroken one. The runs also carry the bench's per-rank measurement (it only
observes), and one test reads each rank's peak and the bytes it sent per step. The first DeepSpeed run on a machine
JIT-builds a small CPU communication op (about a minute; cached afterwards).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import CLI, exit_rank, reselecting_config, run_logged, spawn_ranks
from test_optim import TinyLM, lm_loss, make_batches
from torch import nn

from blockllm_factory._files import BENCH_OUT_ENV
from blockllm_factory.bench import report
from blockllm_factory.bench.runner import read_ranks
from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.settings import DEFAULTS
from blockllm_factory.optim.zero import ZeroBlockLLM
from blockllm_factory.patches.collectives import CollectiveCounter
from blockllm_factory.patches.engine_setup import check_distributed_setup

DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
ZERO1 = DEEPSPEED_DIR / "ds_z1_blockllm.json"
ZERO2 = DEEPSPEED_DIR / "ds_z2_blockllm.json"
ZERO3 = DEEPSPEED_DIR / "ds_z3_blockllm.json"
# Engine -> what the run adds to the recipe. bf16 runs DeepSpeed's mixed precision (bf16 weights, fp32 partitions).
ENGINES = {
    "ddp": {},
    "zero1": {"deepspeed": str(ZERO1)},
    "zero2": {"deepspeed": str(ZERO2)},
    "zero3": {"deepspeed": str(ZERO3)},
    "zero3_bf16": {"deepspeed": str(ZERO3), "bf16": True},
    # ZeRO-1 with bf16 weights (DeepSpeed's ZeRO optimizer with fp32 partitions; its BF16_Optimizer would need
    # data_types.grad_accum_dtype fp32): a rebuild gathers the fp32 values of the tensors that stay selected
    "zero1_bf16": {"deepspeed": str(ZERO1), "bf16": True},
    # 8-bit moments through LLaMA-Factory's `optim`; the tiny model's fragments are under bitsandbytes' 4096-entry
    # minimum, so they stay fp32 and the run must equal DDP's (the 8-bit codes: test_zero_optimizer_keeps_8bit_...)
    "zero2_8bit": {"deepspeed": str(ZERO2), "optim": "adamw_bnb_8bit"},
}
STEPS = 8
DDP_STEPS = 12
MEASURED = ("ddp", "zero3")  # the runs that carry the bench's per-rank measurement
RANK_DUMP_ENV = "BLOCKLLM_TEST_RANK_DUMP"
RANK_DUMP = '''
"""Test-only instrumentation (tests/test_distributed.py), loaded at interpreter start through PYTHONPATH.

With BLOCKLLM_TEST_RANK_DUMP=DIR, every rank writes its BlockLLM selection record and full weights (gathered under
ZeRO-3) to DIR/rank<N>.pt when Trainer.train returns, so that the test can compare ranks and engines.
"""
import os

_directory = os.environ.get("BLOCKLLM_TEST_RANK_DUMP")
if _directory:
    from blockllm_factory import _import_hook

    _apply = _import_hook._apply
    _wrapped = []

    def _dump(trainer):
        import contextlib

        import torch

        from blockllm_factory.patches.trainer import find_blockllm

        optimizer = find_blockllm(trainer.optimizer)
        params = list(trainer.model.named_parameters())
        gather = contextlib.nullcontext()
        if any(hasattr(param, "ds_numel") for _, param in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=None)
        with gather:
            weights = {name: param.detach().to("cpu", torch.float32, copy=True) for name, param in params}
        stage3 = getattr(trainer.model_wrapped, "optimizer", None)  # DeepSpeed's ZeRO optimizer, if any
        record = {
            "rank": trainer.args.process_index,
            "world_size": trainer.args.world_size,
            "events": [dict(event) for event in optimizer.selection_events],
            "norms": optimizer.norm_table,
            "visits": optimizer.visit_counts,
            "selection": optimizer.selection,
            "skipped_steps": optimizer.skipped_steps,
            "weights": weights,
            # ZeRO: the tensors DeepSpeed's partitions hold, and the size of this rank's fp32 partition
            "partition": list(getattr(optimizer, "partition_names", [])),
            "fp32_partition_numel": sum(
                flat.numel()
                # ZeRO-3, ZeRO-1/2, ZeRO-1 with bf16 weights and fp32 gradient accumulation (BF16_Optimizer)
                for attribute in (
                    "fp32_partitioned_groups_flat",
                    "single_partition_of_fp32_groups",
                    "fp32_groups_flat_partition",
                )
                for flat in getattr(stage3, attribute, ())
            ),
        }
        os.makedirs(_directory, exist_ok=True)
        torch.save(record, os.path.join(_directory, f"rank{trainer.args.process_index}.pt"))

    def _apply_then_dump_after_training(fullname, module):
        _apply(fullname, module)
        if fullname.startswith("llamafactory.train.") and fullname.endswith(".trainer") and not _wrapped:
            import transformers

            train = transformers.Trainer.train

            def train_then_dump(self, *args, **kwargs):
                result = train(self, *args, **kwargs)
                _dump(self)
                return result

            transformers.Trainer.train = train_then_dump
            _wrapped.append(train)

    _import_hook._apply = _apply_then_dump_after_training
'''


# ---------------------------------------------------------------------------------------------------- DDP, in torch
def _batches(rank: int, world: int, steps: int) -> list[torch.Tensor]:
    """Global batches of 8 sequences; each of ``world`` ranks takes its equal share."""
    generator = torch.Generator().manual_seed(123)
    share = 8 // world
    return [
        torch.randint(0, 64, (8, 12), generator=generator)[share * rank : share * (rank + 1)] for _ in range(steps)
    ]


def _blockllm(probe: str, block_size: int, coverage: int = 1, averaged: bool = True) -> tuple[nn.Module, BlockLLM]:
    """The model and BlockLLM as under DDP (``averaged``): no DDP wrapper (BlockLLM's weights are all it would reduce);
    BlockLLM averages its own gradients across ranks (one all-reduce a step), as the Trainer wiring switches it on."""
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=3)
    settings = {"lr": 1e-2, "sparsity": 0.8, "patience": 1, "seed": 3}  # patience 1: frequent reselections
    optimizer = BlockLLM(model.named_parameters(), probe=probe, block_size=block_size, coverage=coverage, **settings)
    if averaged:
        optimizer.average_gradients_across_ranks()
    return model, optimizer


def _reduced_numel(optimizer: BlockLLM) -> int:
    """Coordinates BlockLLM will average this step, counted here from its public selection and states (not from the
    averager): the probed blocks whole; a tensor's selected blocks whole on its selection's first step (no state yet:
    the mask is cut from the averaged gradient) or while one of its blocks is probed, else their kept coordinates;
    plus one flag per tensor."""
    probed = {optimizer.blocks[name].param for name in optimizer.probed_blocks}
    numel = sum(optimizer.block_sizes[name] for name in optimizer.probed_blocks)
    selected = {optimizer.blocks[name].param for name in optimizer.kept_coordinates}
    for name, kept in optimizer.kept_coordinates.items():
        param = optimizer.blocks[name].param
        whole = param in probed or not optimizer.state.get(optimizer.param_by_name[param])
        numel += optimizer.block_sizes[name] if whole else kept
    return numel + len(selected | probed)


def _run_ddp_worker(
    rank: int, world: int, init_file: str, out_dir: str, probe: str, block_size: int, coverage: int
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, optimizer = _blockllm(probe, block_size, coverage)
        # The bench's collective counter (patches/collectives.py) sees what this rank sends.
        counter = CollectiveCounter()
        counter.start()
        reduced, probed = [], []
        try:
            for step, tokens in enumerate(_batches(rank, world, DDP_STEPS)):
                reduced.append(_reduced_numel(optimizer))
                probed.append(sum(optimizer.block_sizes[name] for name in optimizer.probed_blocks))
                counter.begin_step(step)
                loss = lm_loss(model, tokens)
                loss.backward()
                optimizer.reduce_gradients()  # after the step's last backward, as the Trainer wiring calls it
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                optimizer.record_loss(float(mean_loss) / world)
                optimizer.step()
                optimizer.zero_grad()
                counter.end_step()
        finally:
            counter.stop()
        record = _record(model, optimizer)
        record.update(
            sent=counter.summary(),
            reduced=reduced,
            probed=probed,
            blocks=len(optimizer.block_names),
            budget=optimizer.budget,
        )
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def _record(model: nn.Module, optimizer: BlockLLM) -> dict:
    return {
        "events": optimizer.selection_events,
        "norms": optimizer.norm_table,
        "weights": {name: param.detach().clone() for name, param in model.named_parameters()},
    }


def assert_match_one_process(ranks: list[dict], alone: dict) -> None:
    """Two ranks' records (:func:`_record`'s keys) against one process on the global batch: the same selections, norm
    tables equal across ranks and to one process's to 1e-5, weights bit-equal across ranks and to one process's to
    1e-5."""
    assert ranks[0]["events"] == ranks[1]["events"] == alone["events"]
    assert ranks[0]["norms"] == ranks[1]["norms"]
    # Selected and probed blocks are measured on the averaged gradient: the norm one process measures on the batch.
    assert ranks[0]["norms"].keys() == alone["norms"].keys()
    for name, norm in alone["norms"].items():
        assert ranks[0]["norms"][name] == pytest.approx(norm, rel=1e-5)
    for name, weight in alone["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=0, atol=1e-5)


def _train_alone(model: nn.Module, optimizer: BlockLLM, steps: int = DDP_STEPS) -> dict:
    """One process on the global batch (the ranks' shares together)."""
    for tokens in _batches(0, 1, steps):
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.record_loss(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return _record(model, optimizer)


@pytest.mark.parametrize(
    ("probe", "block_size", "coverage"),
    # 64: row groups of 4 rows, the LLaMA-Factory default's kind; coverage 4: each picked block keeps a quarter
    [("sample", 0, 1), ("exact", 0, 1), ("sample", 64, 1), ("sample", 64, 4)],
    ids=["sample", "exact", "sample_row_groups", "sample_row_groups_coverage4"],
)
def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(tmp_path, probe, block_size, coverage):
    out = spawn_ranks(_run_ddp_worker, (probe, block_size, coverage), tmp_path)  # known teardown flake: see run_cli
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]

    # The reference is one process on the same path, unreduced: under DDP the unselected row groups of a selected
    # tensor are not measured (their gradients would cross the wire), and a partly kept selected block is measured on
    # its kept coordinates after its selection's first step (test_averaged_path_in_one_process_trains_the_same).
    model, optimizer = _blockllm(probe, block_size, coverage)
    alone = _train_alone(model, optimizer)

    assert len(alone["events"]) >= 3  # the loss rule fired: several selections to agree on
    assert_match_one_process(ranks, alone)
    # Bytes each rank sent per step, counted as the c10d operators went by: BlockLLM's averaged gradients (fp32: the
    # selected blocks or their kept coordinates, the probed blocks, a flag per tensor), its measurement vector
    # (float64, two per block, the loss sum and count) and the test's loss (one fp32). No DDP bucket: nothing of the
    # unselected blocks crosses the wire.
    vector = 8 * (2 * ranks[0]["blocks"] + 2) + 4
    flags = 4 * len(optimizer.eligible_params)  # at most one flag per tensor
    for rank in ranks:
        sent = rank["sent"]["collective_bytes_per_step"]
        assert sent == [4 * numel + vector for numel in rank["reduced"]]
        assert rank["sent"]["collective_calls_by_op"].keys() == {"allreduce_"}
        assert rank["sent"]["collective_calls_by_op"]["allreduce_"] == 3 * DDP_STEPS  # gradients, measurements, loss
        if block_size:
            # Issue 20's bound, on every step after a selection's first (whose blocks cross whole, coverage budgets'
            # worth, to cut the masks): the budget in the gradients' dtype, plus the probed blocks.
            first_steps = {0} | {event["step"] for event in rank["events"]}  # a selection made at step s: s is next
            later = [step for index, step in enumerate(zip(sent, rank["probed"])) if index not in first_steps]
            assert later
            for step, probed in later:
                assert step <= rank["budget"] * 4 + 4 * probed + flags + vector
            if coverage > 1:  # the first steps carry about coverage budgets: the saving is real
                assert max(sent[index] for index in first_steps if index < len(sent)) > 3 * rank["budget"] * 4


def test_averaged_path_in_one_process_trains_the_same():
    """The averaged path (kept coordinates only after a selection's first step) updates the weights exactly as the
    plain one-process path does; a selected block that is kept whole has the same norm, a partly kept one is measured
    on its kept coordinates. (The unselected row groups of a selected tensor are not measured on this path: the row
    groups' difference, docs/distributed.md.) One selection (no reselection), coverage 4: picked blocks keep a
    quarter."""
    records = {}
    for averaged in (False, True):
        model, optimizer = _blockllm("sample", 64, coverage=4, averaged=averaged)
        optimizer.patience = 10**6
        records[averaged] = _train_alone(model, optimizer, steps=6)
        kept, sizes = optimizer.kept_coordinates, optimizer.block_sizes
    plain, averaged = records[False], records[True]
    assert plain["events"] == averaged["events"] and len(plain["events"]) == 1
    for name, weight in plain["weights"].items():
        assert torch.equal(averaged["weights"][name], weight), name
    partial = {name for name, count in kept.items() if count < sizes[name]}
    assert partial  # coverage 4: blocks keep a quarter
    for name in kept:
        if name in partial:
            assert averaged["norms"][name] < plain["norms"][name]  # the kept quarter's norm, less than the whole's
        else:
            assert averaged["norms"][name] == pytest.approx(plain["norms"][name], rel=1e-6)


# ---------------------------------------------------------------------------------------------------- llamafactory-cli
def _config(assets, output_dir: Path, **extra) -> dict:
    return reselecting_config(
        assets,
        output_dir,
        steps=STEPS,
        save_steps=4,
        blockllm_block_size=0,  # whole tensors on every engine (the ZeRO adapter serves only those), so they compare
        per_device_train_batch_size=1,
        learning_rate=3.0e-2,  # large enough for the loss to stall now and then: reselections
        **extra,
    )


def run_cli(
    config: dict, path: Path, processes: int = 2, timeout: int = 900, **env: str
) -> subprocess.CompletedProcess:
    """``llamafactory-cli train`` on ``config``; with ``processes`` > 1 through torchrun (FORCE_TORCHRUN)."""
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is valid YAML
    instrumentation = path.parent / "rank_dump"
    instrumentation.mkdir(exist_ok=True)
    (instrumentation / "sitecustomize.py").write_text(RANK_DUMP, encoding="utf-8")
    extra = {"PYTHONPATH": str(instrumentation), **env}  # cli_env puts the venv's bin/ (torchrun) first on PATH
    if processes > 1:
        extra.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes))
    for attempt in range(2):
        result = run_logged([str(CLI), "train", str(path)], path.parent, timeout, **extra)
        if result.returncode == 0 or not is_teardown_abort(result.log):
            break
        # Known flake (docs/distributed.md): after training and saving, a rank can abort in C++ teardown ("terminate
        # called without an active exception") under two-process gloo + DeepSpeed on CPU. Run once more from scratch.
        shutil.rmtree(config["output_dir"], ignore_errors=True)
        if RANK_DUMP_ENV in env:
            shutil.rmtree(env[RANK_DUMP_ENV], ignore_errors=True)
        print(f"{path.name}: rank aborted in teardown after training (attempt {attempt + 1}); running again")
    assert result.returncode == 0, result.log[-6000:]
    return result


def is_teardown_abort(log: str) -> bool:
    return "terminate called without an active exception" in log and "Training completed" in log


def load_dumps(directory: Path, world: int = 2) -> list[dict]:
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def assert_ranks_agree(dumps: list[dict]) -> None:
    first = dumps[0]
    for other in dumps[1:]:
        assert other["events"] == first["events"]
        assert other["norms"] == first["norms"] and other["visits"] == first["visits"]
        assert other["selection"] == first["selection"]
        assert other["weights"].keys() == first["weights"].keys()
        for name, weight in first["weights"].items():
            assert torch.equal(other["weights"][name], weight), name


@pytest.fixture(scope="module")
def distributed_runs(tiny_llamafactory_assets, tmp_path_factory):
    """One run of the same recipe per engine (2 processes each), with per-rank dumps."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {}
    for engine_name, extra in ENGINES.items():
        config = _config(tiny_llamafactory_assets, root / engine_name, **extra)
        env = {RANK_DUMP_ENV: str(root / f"{engine_name}_dump")}
        if engine_name in MEASURED:  # the bench's measurement rides along (it only observes): each rank writes its own
            env[BENCH_OUT_ENV] = str(_metrics(root, engine_name))
        result = run_cli(config, root / f"{engine_name}.yaml", **env)
        runs[engine_name] = {"config": config, "log": result.log, "dumps": load_dumps(root / f"{engine_name}_dump")}
    runs["root"] = root
    return runs


def _metrics(root: Path, engine_name: str) -> Path:
    return root / f"{engine_name}_metrics" / "metrics.json"


@pytest.mark.parametrize("engine_name", MEASURED)
def test_each_rank_reports_its_all_storage_peak_and_the_bytes_it_sent_per_step(distributed_runs, engine_name):
    """The bench's per-rank measurement on a real two-process run: each rank's all-storage peak and its composition,
    and the bytes it handed to collectives at every optimizer step (patches/collectives.py), for the report."""
    ranks = read_ranks(_metrics(distributed_runs["root"], engine_name))
    assert [rank["rank"] for rank in ranks] == [0, 1]
    # Both engines train with non-reentrant checkpointing, and say so (Engine.non_reentrant_checkpointing).
    assert "`use_reentrant_gc` set to false" in distributed_runs[engine_name]["log"]
    eligible = ranks[0]["eligible_parameters"]
    for rank in ranks:
        assert rank["engine"]["kind"] == ("ddp" if engine_name == "ddp" else "deepspeed")
        assert rank["engine"]["world_size"] == 2
        assert sum(rank["peak_composition"].values()) == rank["peak_storage_bytes"] > 0
        sent = rank["collective_bytes_per_step"]
        assert len(sent) == STEPS
        if engine_name == "ddp":
            # No DDP bucket: BlockLLM averages its own gradients once per optimizer step (gradient accumulation 2:
            # after the second micro-step). Its first step probes every block (every eligible gradient, once); later
            # steps send the selected tensors (whole tensors here: the budget plus less than one tensor) and the
            # probed ones, beside small vectors (BlockLLM's measurements, the Trainer's loss).
            largest = max(
                weight.numel()
                for name, weight in _initial_weights(distributed_runs).items()
                if "embed" not in name and "lm_head" not in name
            )
            bound = 4 * (eligible // 5 + largest * (1 + DEFAULTS["probe_blocks"])) + 16 * 1024  # sparsity 0.8
            assert 4 * eligible <= sent[0] <= 4 * eligible + 16 * 1024
            assert all(step <= bound for step in sent[1:]) and bound < 4 * eligible
        else:
            # ZeRO-3 all-gathers every weight from its shards (this rank's input: its half) at each of the step's two
            # micro-steps, and reduce-scatters the gradients produced.
            assert rank["engine"]["zero_stage"] == 3
            assert all(step >= 2 * 4 * eligible // 2 for step in sent)
            by_op = rank["collective_bytes_by_op"]
            assert by_op["_allgather_base_"] >= STEPS * 2 * 4 * eligible // 2 and by_op["_reduce_scatter_base_"] > 0
            # Each rank holds its half of every weight as DeepSpeed's shards (ds_tensor): counted as weights, not
            # as temporaries, in the tracked figures and at the peak.
            assert rank["parameter_bytes"] >= 4 * eligible // 2
            assert rank["peak_composition"]["weights"] >= 4 * eligible // 2
    # The ranks send the same, except what rank 0 broadcasts (DDP its buffers at each forward, DeepSpeed more).
    first, second = (rank["collective_bytes_per_step"] for rank in ranks)
    broadcast = ranks[0]["collective_bytes_by_op"].get("broadcast_", 0)
    assert ranks[1]["collective_bytes_by_op"].get("broadcast_", 0) == 0
    assert all(0 <= a - b <= broadcast for a, b in zip(first, second))
    record = {"name": engine_name, "engine": ranks[0]["engine"], "ranks": ranks}
    rows = report._rank_table([record])[2:]
    assert len(rows) == 2 and all(row.startswith(f"| {engine_name} |") for row in rows)


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_two_ranks_make_the_same_selections_and_end_with_equal_weights(distributed_runs, engine_name):
    dumps = distributed_runs[engine_name]["dumps"]
    assert [dump["world_size"] for dump in dumps] == [2, 2]
    assert dumps[0]["selection"]["step"] == STEPS
    assert len(dumps[0]["events"]) >= 2, "expected at least one reselection in the run"
    assert_ranks_agree(dumps)


@pytest.mark.parametrize("engine_name", ["zero1", "zero2", "zero3", "zero2_8bit"])
def test_deepspeed_trains_like_ddp(distributed_runs, engine_name):
    """Same recipe, same data (fp32): ZeRO's partitioned measurement and update reproduce DDP's run up to rounding."""
    reference = distributed_runs["ddp"]["dumps"][0]
    dump = distributed_runs[engine_name]["dumps"][0]
    assert [event["names"] for event in dump["events"]] == [event["names"] for event in reference["events"]]
    for name, norm in reference["norms"].items():
        assert dump["norms"][name] == pytest.approx(norm, rel=1e-4), name
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(dump["weights"][name], weight, rtol=0, atol=1e-5)
    changed = sum(
        int((dump["weights"][name] != weight).sum()) for name, weight in _initial_weights(distributed_runs).items()
    )
    assert changed > 0
    stage = 2 if engine_name == "zero2_8bit" else int(engine_name[-1])
    assert_partitions_hold_the_selection_only(distributed_runs[engine_name]["dumps"], stage=stage)
    if engine_name == "zero2_8bit":
        assert "8-bit moments" in distributed_runs[engine_name]["log"]


def assert_partitions_hold_the_selection_only(dumps: list[dict], stage: int = 3) -> None:
    """DeepSpeed's fp32 (and gradient) partitions were rebuilt to the last selection: each rank's fp32 partition is its
    share (DeepSpeed's padded half) of the selected tensors, not of every eligible one."""
    for dump in dumps:
        selected = dump["events"][-1]["names"]
        assert dump["partition"] == selected
        shapes = {name: dump["weights"][name].numel() for name in selected}
        if stage == 3:  # each tensor cut in halves, padded to whole halves
            assert dump["fp32_partition_numel"] == sum(-(-numel // 2) for numel in shapes.values())
        else:  # ZeRO-1/2: one flat buffer of the tensors, padded to a multiple of 2 x 2 ranks, cut in halves
            assert dump["fp32_partition_numel"] == -(-sum(shapes.values()) // 4) * 2
        eligible = sum(
            weight.numel() for name, weight in dump["weights"].items() if "embed" not in name and "lm_head" not in name
        )
        assert dump["fp32_partition_numel"] < eligible // 4


@pytest.mark.parametrize("engine_name", ["zero3_bf16", "zero1_bf16"])
def test_zero_with_bf16_weights_trains_and_ranks_agree(distributed_runs, engine_name):
    """bf16 weights with DeepSpeed's fp32 partitions as masters: the update goes to the partition and reaches the
    weights (bf16 compute changes the gradients, so the coordinates picked differ from the fp32 run's). Under ZeRO-1
    a rebuild also gathers the fp32 values of the tensors that stay selected (hf/zero12.py); some do in this run."""
    dump = distributed_runs[engine_name]["dumps"][0]
    initial = _initial_weights(distributed_runs)
    changed = {
        name for name, weight in dump["weights"].items() if not torch.equal(weight, initial[name].bfloat16().float())
    }
    selected = {name for event in dump["events"][:-1] for name in event["names"]}
    assert changed and changed <= selected  # only blocks BlockLLM selected moved
    assert_partitions_hold_the_selection_only(distributed_runs[engine_name]["dumps"], stage=int(engine_name[4]))
    assert all(torch.isfinite(weight).all() for weight in dump["weights"].values())
    events = dump["events"]
    assert any(set(old["names"]) & set(new["names"]) for old, new in zip(events, events[1:]))


def _initial_weights(distributed_runs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model_dir = Path(distributed_runs["ddp"]["config"]["model_name_or_path"])
    return {name: tensor.float() for name, tensor in load_file(model_dir / "model.safetensors").items()}


@pytest.mark.parametrize("engine_name", ["ddp", "zero2", "zero3"])
def test_resumed_run_ends_bit_identical_to_the_unbroken_one(distributed_runs, engine_name):
    unbroken = distributed_runs[engine_name]
    root = distributed_runs["root"]
    checkpoint = Path(unbroken["config"]["output_dir"]) / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file()
    config = dict(unbroken["config"], output_dir=str(root / f"{engine_name}_resumed"))
    config["resume_from_checkpoint"] = str(checkpoint)
    result = run_cli(
        config,
        root / f"{engine_name}_resumed.yaml",
        **{RANK_DUMP_ENV: str(root / f"{engine_name}_resumed_dump")},
    )
    assert "Resuming training from checkpoint" in result.log
    resumed = load_dumps(root / f"{engine_name}_resumed_dump")
    assert_ranks_agree(resumed)
    for rank in range(2):
        before, after = unbroken["dumps"][rank], resumed[rank]
        assert after["events"] == before["events"] and after["norms"] == before["norms"]
        for name, weight in before["weights"].items():
            assert torch.equal(after["weights"][name], weight), name


# ---------------------------------------------------------------------------------------------------- set-up checks
class _Args:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


def _training_args(**values) -> _Args:
    defaults = {
        "fsdp": None,
        "deepspeed": None,
        "world_size": 2,
        "ddp_find_unused_parameters": None,
        "ddp_static_graph": None,
        "max_grad_norm": 1.0,
    }
    return _Args(**{**defaults, **values})


def test_ddp_setup_looks_for_unused_parameters_and_uses_non_reentrant_checkpointing():
    model_args = _Args(disable_gradient_checkpointing=False, use_reentrant_gc=True)
    training_args = _training_args()
    check_distributed_setup(model_args, _Args(), training_args)
    assert training_args.ddp_find_unused_parameters is True
    assert model_args.use_reentrant_gc is False


def test_zero3_setup_uses_non_reentrant_checkpointing_and_zero2_keeps_the_users_choice():
    """ZeRO-3 only: reentrant recomputation makes DeepSpeed hold every gathered frozen weight to the backward's end
    (a real ZeRO-3 run logs the switch: test_each_rank_reports_...)."""
    from blockllm_factory.hf.engine import DEEPSPEED, SINGLE, Engine
    from blockllm_factory.patches.engine_setup import use_non_reentrant_checkpointing

    for engine, reentrant in (
        (Engine(DEEPSPEED, 2, 3), False),
        (Engine(DEEPSPEED, 2, 2), True),
        (Engine(SINGLE), True),
    ):
        model_args = _Args(disable_gradient_checkpointing=False, use_reentrant_gc=True)
        use_non_reentrant_checkpointing(model_args, engine)
        assert model_args.use_reentrant_gc is reentrant, engine
    # Without gradient checkpointing there is nothing to switch.
    model_args = _Args(disable_gradient_checkpointing=True, use_reentrant_gc=True)
    use_non_reentrant_checkpointing(model_args, Engine(DEEPSPEED, 2, 3))
    assert model_args.use_reentrant_gc is True


def test_llamafactory_trainers_leave_save_model_together_across_processes(monkeypatch):
    """Rank 0 writes the model alone: every rank waits for it before going on (patches/trainer.py, the gloo teardown
    flake of docs/distributed.md), and one process does not wait at all."""
    import torch.distributed as dist

    from blockllm_factory.patches.trainer import _save_together

    calls = []
    trainer = SimpleNamespace(save_model=lambda output_dir=None: calls.append(("save", output_dir)) or "saved")
    _save_together(trainer)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: calls.append(("barrier", None)))
    for world, expected in ((2, [("save", "out"), ("barrier", None)]), (1, [("save", "out")])):
        calls.clear()
        monkeypatch.setattr(dist, "get_world_size", lambda *args, world=world: world)
        assert trainer.save_model("out") == "saved"
        assert calls == expected


def test_the_engine_is_decided_once_from_the_arguments_and_every_part_reads_it(tmp_path):
    from transformers import TrainingArguments

    from blockllm_factory.hf.engine import DDP, DEEPSPEED, SINGLE, Engine, engine_of
    from blockllm_factory.patches.engine_setup import run_engine
    from blockllm_factory.patches.precision import keeps_half_precision_weights

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    assert engine_of(_training_args(world_size=1)) == Engine(SINGLE, 1, 0)
    assert engine_of(_training_args()) == Engine(DDP, 2, 0)
    assert engine_of(_training_args(deepspeed=str(config))) == Engine(DEEPSPEED, 2, 3)
    # Kept for the arguments object it was decided from: a later change of the arguments does not move it.
    arguments = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    decided = engine_of(arguments)
    assert decided.kind == SINGLE and engine_of(arguments) is decided
    # Who owns what, per engine: the table of docs/distributed.md.
    single, ddp, zero3 = Engine(SINGLE), Engine(DDP, 2), Engine(DEEPSPEED, 2, 3)
    zero2 = Engine(DEEPSPEED, 2, 2)
    assert [engine.compact_gradients for engine in (single, ddp, zero3)] == [True, True, False]
    assert [engine.averages_gradients for engine in (single, ddp, zero3)] == [False, True, False]
    assert [engine.probe_measurement for engine in (single, ddp, zero2, zero3)] == [
        "hooks",
        "averaged",
        "scattered",
        "scattered",
    ]
    assert [engine.rebuilds_partitions for engine in (single, ddp, zero2, zero3)] == [False, False, True, True]
    assert [engine.own_masters for engine in (single, ddp, zero3)] == [True, True, False]
    assert [engine.clips_in_optimizer for engine in (single, ddp, zero3)] == [False, False, True]
    assert [engine.loss_in_backward for engine in (single, ddp, zero3)] == [False, False, True]
    # The parse-time check keeps the run's decision; the weights' precision at model loading reads it (one process
    # last: the decision this test leaves behind in its process is the default one).
    for training_args, bf16, fp16 in ((_training_args(), True, True), (_training_args(world_size=1), True, True)):
        check_distributed_setup(_Args(disable_gradient_checkpointing=True), _Args(), training_args)
        assert run_engine() == engine_of(training_args)
        assert keeps_half_precision_weights(_Args(compute_dtype=torch.bfloat16)) is bf16
        assert keeps_half_precision_weights(_Args(compute_dtype=torch.float16)) is fp16


# ---------------------------------------------------------------------------------------------------- ZeRO optimizer
def test_a_probed_slice_is_reduced_to_its_norm_at_the_steps_last_micro_step():
    """ZeRO's probe hook outside the partitions: micro-steps add into the slice, the last one reduces it to its squared
    norm at once (a step probing every tensor then holds one slice at a time), and a slice left over from a step that
    never reached step() is started afresh, not added to."""
    from blockllm_factory.optim.zero import _probe_slice_hook, _squared_norm

    param = nn.Parameter(torch.zeros(3))
    slices: dict = {}
    hook = _probe_slice_hook(slices, "w", micro_steps=2)
    first, second = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 0.0, 2.0])
    param.grad = first.clone()
    hook(param)
    assert param.grad is None and slices["w"][0].shape == (3,) and slices["w"][1:] == [3, 1]
    param.grad = second.clone()
    hook(param)
    assert slices["w"][0].dim() == 0 and slices["w"][2] == 2
    torch.testing.assert_close(slices["w"][0], (first + second).square().sum())
    assert _squared_norm(slices["w"][0]) is slices["w"][0]
    param.grad = second.clone()  # the next step's first micro-step, the last one never measured
    hook(param)
    assert torch.equal(slices["w"][0], second) and slices["w"][2] == 1


def _decay_groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [entry for entry in named if entry[0].endswith("bias")], "weight_decay": 0.0},
        {"params": [entry for entry in named if not entry[0].endswith("bias")], "weight_decay": 0.1},
    ]


def test_zero_optimizer_shows_deepspeed_one_group_and_resumes_through_torchs_load_state_dict():
    """DeepSpeed calls step() once per parameter group: ZeroBlockLLM is built with one. Its per-rank checkpoint goes
    back through torch's load_state_dict, so the hooks registered on the optimizer fire."""
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=2)
    saved_optimizer = ZeroBlockLLM(_decay_groups(model), lr=1e-2, sparsity=0.8, seed=3, max_grad_norm=1.0)
    assert len(saved_optimizer.param_groups) == 1
    assert saved_optimizer.param_groups[0]["weight_decay"] == 0.0  # per block instead
    assert set(saved_optimizer.param_groups[0]["param_names"]) == {name for name, _ in model.named_parameters()}
    saved = saved_optimizer.state_dict()

    optimizer = ZeroBlockLLM(_decay_groups(model), lr=1e-3, sparsity=0.8, seed=99, max_grad_norm=1.0)
    fired = []
    optimizer.register_load_state_dict_pre_hook(lambda opt, state: fired.append(("pre", "blockllm_zero" in state)))
    optimizer.register_load_state_dict_post_hook(lambda opt: fired.append(("post", opt.param_groups[0]["lr"])))
    optimizer.load_state_dict(saved)
    assert fired == [("pre", True), ("post", 1e-2)]
    assert optimizer.probed_blocks == saved_optimizer.probed_blocks == optimizer.block_names
    assert torch.equal(optimizer.run_state()["rng_state"], saved["blockllm"]["rng_state"])


class _RecordingRebuild:
    """A PartitionRebuilder without DeepSpeed: records what the optimizer asks for (one process)."""

    checkpoints_all_weights = False

    def __init__(self) -> None:
        self.rebuilt: list[list[str]] = []

    def rebuild(self, params) -> None:
        self.rebuilt.append(list(params))

    def shard(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.data.view(-1)

    def shards_written(self, params) -> None:
        pass


def test_zero3_partitions_start_with_one_placeholder_and_probed_tensors_are_measured_outside_them():
    """Under ZeRO-3 the engine builds its first partition from the optimizer's group: one placeholder (the smallest
    tensor), not every eligible one; every other probed tensor's gradient is taken by the optimizer's hook and freed.
    A checkpoint names the partition, and a state saved without partitions is refused by a partitioned optimizer."""
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=2)
    rebuild = _RecordingRebuild()
    optimizer = ZeroBlockLLM(_decay_groups(model), lr=1e-2, sparsity=0.8, seed=3, partitions=rebuild)
    sizes = optimizer.block_sizes
    placeholder = min(optimizer.block_names, key=lambda name: sizes[name])
    assert optimizer.partition_names == [placeholder] and rebuild.rebuilt == []  # built by the engine, not rebuilt
    assert optimizer.param_groups[0]["params"] == [optimizer.param_by_name[placeholder]]
    lm_loss(model, _batches(0, 1, 1)[0]).backward()
    with_grad = {name for name, param in optimizer.param_by_name.items() if param.grad is not None}
    assert with_grad == {placeholder}  # the others were reduced into the optimizer's slices and freed
    saved = optimizer.state_dict()["blockllm_zero"]
    assert saved["partition"] == [placeholder] and saved["shards"] == {}
    plain = ZeroBlockLLM(_decay_groups(model), lr=1e-2, sparsity=0.8, seed=3).state_dict()
    with pytest.raises(ValueError, match="partitions of every trainable tensor, loaded with the selection only"):
        optimizer.load_state_dict(plain)


class _OneRankZero12:
    """DeepSpeed ZeRO-1/2 as seen by its client optimizer, one rank and no DeepSpeed: the trainable tensors flattened
    into one fp32 partition, each tensor's ``_hp_mapping`` pointing at its place there, the gradient reduced into the
    partition's ``.grad`` (zeros where none was produced), ``step()`` called on the partition, and the partition
    copied back into the weights."""

    def __init__(self, optimizer: ZeroBlockLLM) -> None:
        self.optimizer = optimizer
        self.params = list(optimizer.param_by_name.values())
        self.partition = torch.cat([param.detach().reshape(-1) for param in self.params]).clone()
        offset = 0
        for param in self.params:
            numel = param.numel()
            param._hp_mapping = SimpleNamespace(
                lp_fragment_address=SimpleNamespace(start=0, numel=numel),
                hp_fragment_address=SimpleNamespace(start=offset),
            )
            offset += numel
        optimizer.param_groups[0]["params"] = [self.partition]

    def step(self) -> None:
        grads = [torch.zeros(param.numel()) if param.grad is None else param.grad.reshape(-1) for param in self.params]
        self.partition.grad = torch.cat(grads)
        self.optimizer.step()
        with torch.no_grad():
            for param, values in zip(self.params, self.partition.split([param.numel() for param in self.params])):
                param.copy_(values.view_as(param))


def test_zero_optimizer_keeps_8bit_moments_and_trains_like_one_process():
    """``optim_bits=8`` under DeepSpeed ZeRO: the selected coordinates' moments are bitsandbytes' 8-bit codes, and on
    one rank (fragments are whole tensors, so the 8-bit blocks fall where one process puts them) the run matches
    BlockLLM's one-process 8-bit run: same selections, weights to rounding."""
    pytest.importorskip("bitsandbytes")
    settings = {"lr": 1e-2, "sparsity": 0.8, "seed": 3, "block_size": 0, "patience": 2, "optim_bits": 8}
    runs = []
    for zero in (False, True):
        torch.manual_seed(0)
        model = TinyLM(width=64, depth=2)
        if zero:
            optimizer = ZeroBlockLLM(_decay_groups(model), **settings)
            engine = _OneRankZero12(optimizer)
        else:
            optimizer = BlockLLM(_decay_groups(model), **settings)
            engine = optimizer
        for step, tokens in enumerate(make_batches(6)):
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model, tokens)
            loss.backward()
            optimizer.record_loss(loss.item() + (1.0 if step == 3 else 0.0))  # a stall at step 4: a reselection
            engine.step()
        runs.append((model, optimizer))
    (reference, one_process), (model, zero) = runs
    assert [event["names"] for event in zero.selection_events] == [
        event["names"] for event in one_process.selection_events
    ]
    assert len(zero.selection_events) >= 2
    eight_bit = [state for state in zero.state.values() if "exp_avg_q" in state]
    assert eight_bit and all(state["exp_avg_q"].dtype == torch.uint8 for state in eight_bit)
    assert all("exp_avg" not in state for state in eight_bit)  # no fp32 moment kept between steps
    for (name, weight), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-5, msg=name)
    torch.manual_seed(0)
    start = TinyLM(width=64, depth=2)
    assert any(not torch.equal(weight, initial) for weight, initial in zip(model.parameters(), start.parameters()))

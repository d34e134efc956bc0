"""BlockLLM across processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, two processes each.

The first test drives torch's DDP directly (seconds). The others run the real ``llamafactory-cli train`` with
``FORCE_TORCHRUN=1 NPROC_PER_NODE=2`` on the tiny model of conftest.py, with ``BLOCKLLM_FACTORY_RANK_DUMP`` asking
every rank to write its selection record and weights at the end. They assert that both ranks made the same selections
and ended with bit-equal weights, that DDP, ZeRO-2 and ZeRO-3 trained the same way, and that a run resumed from a
checkpoint ends bit-identical to the unbroken one. The first DeepSpeed run on a machine JIT-builds a small CPU
communication op (about a minute; cached afterwards).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.distributed import register_ddp_probe_hook
from blockllm_factory.patches import distributed as engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CLI, run_logged, tiny_config  # noqa: E402
from test_optim import TinyLM, lm_loss  # noqa: E402

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
}
STEPS = 8
DDP_STEPS = 12


# ---------------------------------------------------------------------------------------------------- DDP, in torch
def _batches(rank: int, world: int, steps: int) -> list[torch.Tensor]:
    """Global batches of 8 sequences; each of ``world`` ranks takes its equal share."""
    generator = torch.Generator().manual_seed(123)
    share = 8 // world
    return [
        torch.randint(0, 64, (8, 12), generator=generator)[share * rank : share * (rank + 1)] for _ in range(steps)
    ]


def _run_ddp_worker(rank: int, world: int, init_file: str, probe: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyLM(width=16, depth=3)
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=1, probe=probe, seed=3)
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        register_ddp_probe_hook(wrapped, optimizer)
        for tokens in _batches(rank, world, DDP_STEPS):
            loss = lm_loss(wrapped, tokens)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            optimizer.record_loss(float(mean_loss) / world)
            optimizer.step()
            optimizer.zero_grad()
        torch.save(_record(model, optimizer), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _record(model: nn.Module, optimizer: BlockLLM) -> dict:
    return {
        "events": optimizer.selection_events,
        "norms": optimizer.norm_table,
        "weights": {name: param.detach().clone() for name, param in model.named_parameters()},
    }


@pytest.mark.parametrize("probe", ["sample", "exact"])
def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(tmp_path, probe):
    torch.multiprocessing.spawn(
        _run_ddp_worker, args=(2, str(tmp_path / "init"), probe, str(tmp_path)), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    torch.manual_seed(0)
    model = TinyLM(width=16, depth=3)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=1, probe=probe, seed=3)
    for tokens in _batches(0, 1, DDP_STEPS):
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.record_loss(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    alone = _record(model, optimizer)

    assert len(alone["events"]) >= 3  # the loss rule fired: several selections to agree on
    assert ranks[0]["events"] == ranks[1]["events"] == alone["events"]
    assert ranks[0]["norms"] == ranks[1]["norms"]
    # The probe hook measures probed blocks on DDP's averaged gradient: the norm one process measures on the batch.
    assert ranks[0]["norms"].keys() == alone["norms"].keys()
    for name, norm in alone["norms"].items():
        assert ranks[0]["norms"][name] == pytest.approx(norm, rel=1e-5)
    for name, weight in alone["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- llamafactory-cli
def _config(assets, output_dir: Path, **extra) -> dict:
    return tiny_config(
        assets,
        output_dir,
        blockllm_sparsity=0.8,
        blockllm_patience=1,  # the loss rule fires often: reselections within a few steps
        max_samples=64,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        learning_rate=3.0e-2,  # large enough for the loss to stall now and then: reselections
        max_steps=STEPS,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=4,
        **extra,
    )


def run_cli(
    config: dict, path: Path, processes: int = 2, timeout: int = 900, **env: str
) -> subprocess.CompletedProcess:
    """``llamafactory-cli train`` on ``config``; with ``processes`` > 1 through torchrun (FORCE_TORCHRUN)."""
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is valid YAML
    extra = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    if processes > 1:
        extra.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes))
    for attempt in range(2):
        result = run_logged([str(CLI), "train", str(path)], path.parent, timeout, **extra)
        if result.returncode == 0 or not is_teardown_abort(result.log):
            break
        # Known flake (docs/distributed.md): after training and saving, a rank can abort in C++ teardown ("terminate
        # called without an active exception") under two-process gloo + DeepSpeed on CPU. Run once more from scratch.
        shutil.rmtree(config["output_dir"], ignore_errors=True)
        if "BLOCKLLM_FACTORY_RANK_DUMP" in env:
            shutil.rmtree(env["BLOCKLLM_FACTORY_RANK_DUMP"], ignore_errors=True)
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
        result = run_cli(
            config, root / f"{engine_name}.yaml", BLOCKLLM_FACTORY_RANK_DUMP=str(root / f"{engine_name}_dump")
        )
        runs[engine_name] = {"config": config, "log": result.log, "dumps": load_dumps(root / f"{engine_name}_dump")}
    runs["root"] = root
    return runs


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_two_ranks_make_the_same_selections_and_end_with_equal_weights(distributed_runs, engine_name):
    dumps = distributed_runs[engine_name]["dumps"]
    assert [dump["world_size"] for dump in dumps] == [2, 2]
    assert dumps[0]["selection"]["step"] == STEPS
    assert len(dumps[0]["events"]) >= 2, "expected at least one reselection in the run"
    assert_ranks_agree(dumps)


@pytest.mark.parametrize("engine_name", ["zero1", "zero2", "zero3"])
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


def test_zero3_with_bf16_weights_trains_and_ranks_agree(distributed_runs):
    """bf16 weights with DeepSpeed's fp32 partitions as masters: the update goes to the partition and reaches the
    weights (bf16 compute changes the gradients, so the coordinates picked differ from the fp32 run's)."""
    dump = distributed_runs["zero3_bf16"]["dumps"][0]
    initial = _initial_weights(distributed_runs)
    changed = {
        name for name, weight in dump["weights"].items() if not torch.equal(weight, initial[name].bfloat16().float())
    }
    selected = {name for event in dump["events"][:-1] for name in event["names"]}
    assert changed and changed <= selected  # only blocks BlockLLM selected moved
    assert all(torch.isfinite(weight).all() for weight in dump["weights"].values())


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
        BLOCKLLM_FACTORY_RANK_DUMP=str(root / f"{engine_name}_resumed_dump"),
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
        "resume_from_checkpoint": None,
        "do_train": True,
        "output_dir": "unused-output-dir",
    }
    return _Args(**{**defaults, **values})


def test_ddp_setup_looks_for_unused_parameters_and_uses_non_reentrant_checkpointing():
    model_args = _Args(disable_gradient_checkpointing=False, use_reentrant_gc=True)
    training_args = _training_args()
    engine.check_distributed_setup(model_args, _Args(), training_args)
    assert training_args.ddp_find_unused_parameters is True
    assert model_args.use_reentrant_gc is False

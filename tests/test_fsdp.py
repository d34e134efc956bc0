"""BlockLLM on FSDP2 shards (optim/fsdp.py, ``FsdpBlockLLM``), two gloo processes on CPU against one process.

The model is sharded with torch's ``fully_shard`` directly (no LLaMA-Factory: on CPU accelerate 1.11 never turns FSDP
on, see docs/distributed.md "FSDP2"). The ranks must take the same decisions as one process on the global batch, keep
moments only for the selected coordinates of their own shard, and resume bit-identically from their own state files.
"""

import copy
import os

import torch
import torch.distributed as dist
from helpers import exit_rank, spawn_ranks
from test_distributed import _batches, _decay_groups, assert_match_one_process
from test_engine_interface import INTERFACE, ROOT, _attributes_of
from test_optim import TinyLM, lm_loss
from torch import nn
from torch.distributed.fsdp import fully_shard

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.fsdp import FsdpBlockLLM
from blockllm_factory.optim.interface import EXTENSION_POINTS, BlockLLMEngine

STEPS = 12
CHECKPOINT = 6  # a reselection follows it (patience 1 fires often: the test asserts that one did)
SETTINGS = {"lr": 1e-2, "sparsity": 0.8, "patience": 1, "probe": "sample", "seed": 3}


def _sharded(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, FsdpBlockLLM]:
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=3, dtype=dtype)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, FsdpBlockLLM(_decay_groups(model), **SETTINGS)  # two groups, as LLaMA-Factory makes them


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], world: int) -> None:
    for tokens in batches:
        loss = lm_loss(model, tokens)
        loss.backward()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
        optimizer.record_loss(float(mean_loss) / world)
        optimizer.step()
        optimizer.zero_grad()


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        for name, param in model.named_parameters()
    }


def _local_moments(optimizer: BlockLLM) -> dict[str, int]:
    params = optimizer.param_by_name
    return {name: optimizer.state[params[name]]["exp_avg"].numel() for name in optimizer.kept_coordinates}


def _run_fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = _batches(rank, world, STEPS)
        model, optimizer = _sharded()
        shard = tuple(model.layers[0][0].weight.to_local().shape)
        _train(model, optimizer, batches[:CHECKPOINT], world)
        saved_state = copy.deepcopy(optimizer.state_dict())  # as written to disk: the training goes on in place
        saved_shards = {name: param.to_local().clone() for name, param in model.named_parameters()}
        _train(model, optimizer, batches[CHECKPOINT:], world)
        record = {
            "events": optimizer.selection_events,
            "norms": optimizer.norm_table,
            "weights": _full_weights(model),
            "moments": _local_moments(optimizer),
            "kept": optimizer.kept_coordinates,
            "shard": shard,
        }
        # Resume: a new model and optimizer, this rank's shards and state file, then the remaining steps.
        model, optimizer = _sharded()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.to_local().copy_(saved_shards[name])
        optimizer.load_state_dict(saved_state)
        _train(model, optimizer, batches[CHECKPOINT:], world)
        record.update(resumed_events=optimizer.selection_events, resumed_weights=_full_weights(model))
        # A half-precision model: fp32 masters only for the selected coordinates of this rank's shard.
        model, optimizer = _sharded(torch.bfloat16)
        before = _full_weights(model)
        _train(model, optimizer, batches[:2], world)
        params = optimizer.param_by_name
        record["bf16"] = {
            "masters": {name: optimizer.state[params[name]]["master"].numel() for name in optimizer.kept_coordinates},
            "moments": _local_moments(optimizer),
            "changed": {name: int((weight != before[name]).sum()) for name, weight in _full_weights(model).items()},
            "kept": optimizer.kept_coordinates,
            "budget": optimizer.budget,
        }
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_fsdp2_ranks_agree_match_one_process_and_resume_exactly(tmp_path):
    out = spawn_ranks(_run_fsdp_worker, (), tmp_path)
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]

    torch.manual_seed(0)
    model = TinyLM(width=16, depth=3)
    optimizer = BlockLLM(_decay_groups(model), **SETTINGS)
    batches = _batches(0, 1, STEPS)
    _train(model, optimizer, batches, world=1)
    alone = {"events": optimizer.selection_events, "norms": optimizer.norm_table, "weights": _full_weights(model)}

    assert ranks[0]["shard"] == ranks[1]["shard"] == (16, 16)  # each rank holds half of a 32 x 16 weight
    reselections = [event for event in alone["events"] if event["step"] >= CHECKPOINT]
    assert len(alone["events"]) >= 3 and reselections  # several selections, one after the checkpoint
    assert_match_one_process(ranks, alone)
    # Moments for the selected coordinates of each rank's shard only: the two shards' moments make the selection.
    assert ranks[0]["kept"] == ranks[1]["kept"]
    for name, kept in ranks[0]["kept"].items():
        assert ranks[0]["moments"][name] + ranks[1]["moments"][name] == kept
    assert any(0 < rank["moments"][name] < kept for rank in ranks for name, kept in rank["kept"].items())
    # Resumed from each rank's own state file and shards: bit-identical to the unbroken run.
    for rank in ranks:
        assert rank["resumed_events"] == rank["events"]
        for name, weight in rank["weights"].items():
            assert torch.equal(rank["resumed_weights"][name], weight), name
    # bf16 weights: fp32 masters as large as the moments, together the selection; only selected coordinates move.
    bf16 = [rank["bf16"] for rank in ranks]
    for name, kept in bf16[0]["kept"].items():
        assert bf16[0]["masters"][name] + bf16[1]["masters"][name] == kept
        assert all(rank["masters"][name] == rank["moments"][name] for rank in bf16)
    changed = sum(bf16[0]["changed"].values())
    assert bf16[0]["changed"] == bf16[1]["changed"] and 0 < changed <= bf16[0]["budget"]


def test_fsdp_engine_uses_blockllm_through_the_interface_and_overrides_extension_points_only():
    path = ROOT / "blockllm_factory" / "optim" / "fsdp.py"
    own = set(vars(FsdpBlockLLM)) | {"_group_of"}
    inherited = {name for name, _ in _attributes_of(path, {"self"}) if name not in own}
    assert inherited - INTERFACE == set()
    overridden = {name for name in own if name in vars(BlockLLM) and not name.startswith("__")}
    assert {"_measure", "_apply_updates", "_unpack_state_dict"} <= overridden <= set(EXTENSION_POINTS)
    assert isinstance(FsdpBlockLLM(TinyLM().named_parameters(), sparsity=0.9), BlockLLMEngine)

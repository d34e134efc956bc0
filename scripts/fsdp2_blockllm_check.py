"""A hand check: BlockLLM on FSDP2 shards (``FsdpBlockLLM``) on a real transformers causal LM against one process.
docs/distributed.md ("FSDP2") reports it. From the repository root, with the venv active, after
``blockllm-factory demo build runs/demo/assets``:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/fsdp2_blockllm_check.py runs/demo/assets/model

Every decoder layer and the model are wrapped with ``fully_shard`` (fp32, gloo); each rank trains on its half of
random global batches; rank 0 then trains ``BlockLLM`` in one process on the whole batches and prints whether the
selections agree, the losses and how far the weights are apart after each step, and how many coordinates of the last
selection's top-k masks differ.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.fsdp import FsdpBlockLLM
from blockllm_factory.optim.masks import unpack_mask

SETTINGS = {"lr": 1e-2, "sparsity": 0.95, "patience": 1, "seed": 0}  # patience 1: several selections


def train(model, optimizer, batches, world: int) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Trains on ``batches``; after each step, the mean loss and the whole weights (gathered under FSDP2)."""
    steps = []
    for tokens in batches:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        optimizer.record_loss(float(mean) / world)
        optimizer.step()
        optimizer.zero_grad()
        weights = {
            name: getattr(param, "full_tensor", param.detach)().clone() for name, param in model.named_parameters()
        }
        steps.append((float(mean) / world, weights))
    return steps


def masks(optimizer) -> dict[str, torch.Tensor]:
    """The selection's top-k masks (whole, one bool per coordinate) of the parameters that have one."""
    params = optimizer.param_by_name
    return {
        name: unpack_mask(optimizer.state[params[name]]["mask"], params[name].numel())
        for name in optimizer.kept_coordinates
        if "mask" in optimizer.state.get(params[name], {})
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    batches = [torch.randint(0, model.config.vocab_size, (4, 32), generator=generator) for _ in range(args.steps)]
    share = 4 // world
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = FsdpBlockLLM(model.named_parameters(), **SETTINGS)
    sharded = train(model, optimizer, [batch[share * rank : share * (rank + 1)] for batch in batches], world)
    events, sharded_masks = optimizer.selection_events, masks(optimizer)
    dist.destroy_process_group()  # one process next: BlockLLM would otherwise sum its measurements across ranks
    if rank == 0:
        alone = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        reference = BlockLLM(alone.named_parameters(), **SETTINGS)
        steps = train(alone, reference, batches, 1)
        print(f"selections: {len(events)} on FSDP2, equal to one process's: {events == reference.selection_events}")
        for step, ((loss, weights), (loss_alone, weights_alone)) in enumerate(zip(sharded, steps), start=1):
            gaps = [(weights[name] - weight).abs() for name, weight in weights_alone.items()]
            print(
                f"step {step}: loss {loss:.6f} (one process {loss_alone:.6f}), largest weight difference "
                f"{max(float(gap.max()) for gap in gaps):.3g}, coordinates apart by more than 1e-4: "
                f"{sum(int((gap > 1e-4).sum()) for gap in gaps)}",
                flush=True,
            )
        reference_masks = masks(reference)
        differing = sum(int((sharded_masks[name] != mask).sum()) for name, mask in reference_masks.items())
        kept = sum(int(mask.sum()) for mask in reference_masks.values())
        print(f"last selection's masks: {differing} of {kept} kept coordinates differ", flush=True)
    # Leave without the interpreter's exit, where torch/gloo's C++ teardown sometimes aborts a finished rank (SIGABRT;
    # docs/distributed.md, "Known flake"), and torchrun would then stop rank 0 in the middle of its reference run.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

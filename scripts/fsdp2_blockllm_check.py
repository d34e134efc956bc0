"""A hand check: BlockLLM on FSDP2 shards (``FsdpBlockLLM``) on a real transformers causal LM against one process.
docs/distributed.md ("FSDP2") reports it. From the repository root, with the venv active, after
``blockllm-factory demo build runs/demo/assets``:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/fsdp2_blockllm_check.py runs/demo/assets/model

Every decoder layer and the model are wrapped with ``fully_shard`` (fp32, gloo); each rank trains on its half of
random global batches; rank 0 then trains ``BlockLLM`` in one process on the whole batches and prints whether the
selections agree and how far the weights are apart.
"""

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.fsdp import FsdpBlockLLM

SETTINGS = {"lr": 1e-2, "sparsity": 0.95, "patience": 1, "seed": 0}  # patience 1: several selections


def train(model, optimizer, batches, world: int) -> None:
    for tokens in batches:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        optimizer.record_loss(float(mean) / world)
        optimizer.step()
        optimizer.zero_grad()


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
    train(model, optimizer, [batch[share * rank : share * (rank + 1)] for batch in batches], world)
    sharded = {name: param.full_tensor() for name, param in model.named_parameters()}
    events = optimizer.selection_events
    dist.destroy_process_group()  # one process next: BlockLLM would otherwise sum its measurements across ranks
    if rank == 0:
        alone = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        reference = BlockLLM(alone.named_parameters(), **SETTINGS)
        train(alone, reference, batches, 1)
        gap = max(float((sharded[name] - param).abs().max()) for name, param in alone.named_parameters())
        moved = sum(int((sharded[name] != param).sum()) for name, param in alone.named_parameters())
        print(
            f"selections: {len(events)} on FSDP2, equal to one process's: {events == reference.selection_events}; "
            f"largest weight difference {gap:.3g}; coordinates that differ at all {moved}",
            flush=True,
        )


if __name__ == "__main__":
    main()

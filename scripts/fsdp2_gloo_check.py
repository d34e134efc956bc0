"""A hand check: does FSDP2 (``torch.distributed.fsdp.fully_shard``) run on gloo on CPU here? docs/distributed.md
("FSDP2") reports it. From the repository root, with the venv active:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/fsdp2_gloo_check.py

Two linear layers, each sharded with ``fully_shard`` and the model around them, AdamW, 4 steps; the first weight is
frozen for step 2 only (``requires_grad_(False)``), as BlockLLM freezes a block at a reselection. Every rank prints
its shard's shape, each step's loss and gradient shard, and the full weight gathered at the end.
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
weight = next(model.parameters())
print(rank, "first weight", type(weight).__name__, tuple(weight.to_local().shape), "of", tuple(weight.shape))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for step in range(4):
    loss = model(torch.randn(4, 16)).pow(2).mean()
    loss.backward()
    grad = weight.grad
    shard = None if grad is None else (type(grad).__name__, tuple(grad.to_local().shape))
    print(rank, "step", step + 1, "loss", float(loss), "first weight's gradient", shard, flush=True)
    weight.requires_grad_(step != 0)  # frozen for the second step only
    optimizer.step()
    optimizer.zero_grad()
full = weight.full_tensor()
print(rank, "full weight", tuple(full.shape), "sum", float(full.sum()), flush=True)
dist.destroy_process_group()

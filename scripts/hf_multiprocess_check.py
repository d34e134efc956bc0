"""A hand check of the Trainer front (``blockllm_factory.hf``) across processes: DDP or DeepSpeed, optionally resumed.

Not in the test suite (two training processes cost more than its time budget); docs/hf.md reports its runs. From the
repository root, with the venv active, on a machine without a GPU (torch then trains on the CPU, over gloo):

    export OMP_NUM_THREADS=1
    torchrun --nproc_per_node 2 scripts/hf_multiprocess_check.py runs/hf_check/ddp --save_steps 4
    torchrun --nproc_per_node 2 scripts/hf_multiprocess_check.py runs/hf_check/ddp_resumed \\
        --resume runs/hf_check/ddp/checkpoint-4 --expect runs/hf_check/ddp
    torchrun --nproc_per_node 2 scripts/hf_multiprocess_check.py runs/hf_check/zero3 \\
        --deepspeed recipes/deepspeed/ds_z3_blockllm.json

It builds a tiny random Llama (2 layers, hidden 32, vocabulary 256) and random token sequences from fixed seeds, and
trains 8 optimizer steps with ``BlockLLMTrainer`` (batch 4 per process, gradient accumulation 2, sparsity 0.8,
patience 1, whole tensors as blocks: ``blockllm_block_size: 0``, as DeepSpeed selects). Every rank writes
``OUT/rank<N>.json``: the optimizer class, the steps of its (re)selections and a digest of them, the logged losses,
and a SHA-256 of the full weights (gathered under ZeRO-3). Rank 0 then prints whether all ranks agree, and with
``--expect DIR`` whether this run ended with the weights and selections of the run in ``DIR`` (an unbroken one).

The ``TrainingArguments`` are created before the model, as transformers requires for ZeRO-3 (the model is then
partitioned while it is built), and without ``use_cpu=True``: with it, transformers does not start DeepSpeed's
communication, and ZeRO-3's partitioning sees one process (docs/hf.md).
"""

import argparse
import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--deepspeed", help="a DeepSpeed config, e.g. recipes/deepspeed/ds_z3_blockllm.json")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    parser.add_argument("--resume", help="a checkpoint folder of an earlier run with the same options")
    parser.add_argument("--expect", help="the output_dir of an unbroken run to compare the result with")
    return parser.parse_args()


def weights_digest(model) -> str:
    params = list(model.named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(param, "ds_numel") for _, param in params):  # ZeRO-3 partitions: gather the full weights
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=None)
    digest = hashlib.sha256()
    with gather:
        for name, param in params:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    options = arguments()
    start = time.time()
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        TrainingArguments,
        default_data_collator,
    )

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMTrainer

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    initial = LlamaForCausalLM(config)  # built before DeepSpeed is configured: the same weights under every engine
    with tempfile.TemporaryDirectory() as folder:
        initial.save_pretrained(folder)
        del initial
        args = TrainingArguments(
            output_dir=options.output_dir,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=5e-2,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            max_steps=options.max_steps,
            logging_steps=1,
            save_strategy="steps" if options.save_steps else "no",
            save_steps=options.save_steps or 500,
            report_to=[],
            seed=3,
            data_seed=3,
            disable_tqdm=True,
            deepspeed=options.deepspeed,
        )
        model = AutoModelForCausalLM.from_pretrained(folder)  # under ZeRO-3: partitioned as it loads
    tokens = torch.randint(0, config.vocab_size, (64, 32), generator=torch.Generator().manual_seed(1))
    trainer = BlockLLMTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()}),
        data_collator=default_data_collator,
        blockllm_config=BlockLLMConfig(blockllm_sparsity=0.8, blockllm_patience=1, blockllm_block_size=0),
    )
    trainer.train(resume_from_checkpoint=options.resume)

    optimizer = trainer.blockllm_optimizer
    events = optimizer.selection_events
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "optimizer": type(optimizer).__name__,
        "gradients": "compact" if optimizer.compact_gradients else "dense",
        "selection_steps": [int(event["step"]) for event in events],
        "selections_sha256": hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest(),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "global_step": trainer.state.global_step,
        "weights_sha256": weights_digest(trainer.model),
        "seconds": round(time.time() - start, 1),
    }
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{record['rank']}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    records = [record]
    if dist.is_initialized():
        records = [None] * args.world_size
        dist.all_gather_object(records, record)
    if args.process_index != 0:
        return
    same = ("selections_sha256", "losses", "weights_sha256")
    agree = all(all(other[key] == record[key] for key in same) for other in records)
    print(
        f"{record['optimizer']} on {args.world_size} process(es), {record['gradients']} gradients; selections at "
        f"steps {record['selection_steps']}; last loss {record['losses'][-1]:.6f}; "
        f"weights {record['weights_sha256'][:16]}"
    )
    print(f"ranks agree on selections, losses and weights: {agree}")
    if options.expect:
        expected = json.loads((Path(options.expect) / "rank0.json").read_text(encoding="utf-8"))
        match = {key: expected[key] == record[key] for key in same}
        print(f"same as {options.expect}: {match}")


if __name__ == "__main__":
    main()

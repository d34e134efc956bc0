"""``python -m blockllm_factory.demo build DIR`` and ``python -m blockllm_factory.demo summary OUTPUT_DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from blockllm_factory.demo.assets import build

    assets = build(args.directory, force=args.force)
    print(f"model:    {assets.model_dir}")
    print(f"datasets: {assets.dataset_dir}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    """Say where a finished run put its model, loss plot and selection log; non-zero if one is missing."""
    from blockllm_factory.patches.telemetry import SELECTION_LOG, SELECTION_PLOT

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockllm_factory.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the tiny Llama and the demo datasets (skipped if up to date)")
    build.add_argument("directory", nargs="?", default="runs/demo/assets")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    build.set_defaults(run=_build)
    summary = commands.add_parser("summary", help="print where a finished demo run put its results")
    summary.add_argument("output_dir", nargs="?", default="runs/demo/output")
    summary.set_defaults(run=_summary)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

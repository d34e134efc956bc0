"""The ``glue`` sub-command of ``blockllm-factory``."""

from __future__ import annotations

import argparse
import sys

HELP = "the paper's GLUE experiment (RoBERTa): BlockLLM, GaLore and full fine-tuning in the transformers Trainer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from blockllm_factory.bench.command import add_override_argument

    parser.add_argument("recipe", help="GLUE recipe YAML, e.g. recipes/glue/mrpc.yaml")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: runs/glue/<task>)")
    add_override_argument(
        parser,
        "set a recipe key over the file (repeatable; a section's key dotted, value read as YAML), e.g. "
        "--set model=path/to/roberta --set training.max_steps=20",
    )
    parser.add_argument("--only", metavar="METHOD,...", help="run only these methods, e.g. --only blockllm,full")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from blockllm_factory.bench.suite import SuiteError, parse_override

    from .recipe import RecipeError, load_recipe

    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        if args.only:
            overrides["methods"] = [method.strip() for method in args.only.split(",") if method.strip()]
        recipe = load_recipe(args.recipe, overrides)
        from .runner import run_glue

        run_glue(recipe, Path(args.out or f"runs/glue/{recipe.task.name}"), getattr(args, "command_line", ""))
    except (RecipeError, SuiteError, ValueError) as error:
        print(f"blockllm-factory glue: {error}", file=sys.stderr)
        return 2
    return 0

"""The ``bench`` sub-command of ``blockllm-factory``."""

from __future__ import annotations

import argparse
import sys

HELP = "run BlockLLM, LoRA, GaLore, APOLLO, BAdam and full fine-tuning side by side and report memory, speed and loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML: base (shared LLaMA-Factory arguments) and methods (overrides)")
    parser.add_argument(
        "--out", metavar="DIR", help="report folder (required unless --plan); completed runs there are reused"
    )
    parser.add_argument("--force", action="store_true", help="run again the runs that completed earlier")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this method, group or run (repeatable, e.g. blockllm or blockllm/seed=1); others stay as is",
    )
    add_override_argument(
        parser,
        "set an argument of every run, over the suite (repeatable), e.g. --set max_steps=20 (value read as YAML)",
    )
    parser.add_argument(
        "--seeds",
        metavar="N,N,...",
        help="run every method once per seed, replacing the suite's seeds and seed, e.g. --seeds 1,2,3",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="check the suite and print its runs and model shapes, without building or training anything",
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the trained weights in DIR/runs/<run>/output (removed by default)",
    )


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``; read with ``suite.parse_override``)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=help)


def run(args: argparse.Namespace) -> int:
    from .models import ModelConfigError
    from .report import OK_STATUSES
    from .suite import SuiteError, parse_override, parse_seeds

    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if args.plan:
            from .runner import plan_bench

            plan_bench(args.suite, only=args.only, overrides=overrides, seeds=seeds)
            return 0
        if not args.out:
            raise SuiteError("--out DIR is required (the report folder), unless --plan")
        from .runner import run_bench

        document = run_bench(
            args.suite,
            args.out,
            force=args.force,
            only=args.only,
            overrides=overrides,
            seeds=seeds,
            keep_models=args.keep_models,
            command=getattr(args, "command_line", None),
        )
    except (SuiteError, ModelConfigError) as error:
        print(f"blockllm-factory bench: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"blockllm-factory bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockllm-factory bench: interrupted; completed runs are kept and skipped next time", file=sys.stderr)
        return 130
    failed = [r["name"] for r in document["runs"] if r["status"] not in OK_STATUSES]
    out_of_memory = sum(r["status"] == "out of memory" for r in document["runs"])
    ok = len(document["runs"]) - len(failed) - out_of_memory
    summary = f"{ok} ok, {out_of_memory} out of memory, {len(failed)} failed"
    print(f"[bench] report: {args.out}/report.md ({summary})")
    return 1 if failed else 0

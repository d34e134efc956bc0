"""The ``bench`` sub-command of ``blockllm-factory``."""

from __future__ import annotations

import argparse
import sys

HELP = "run BlockLLM, LoRA, GaLore, BAdam and full fine-tuning side by side and report memory, speed and loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML: base (shared LLaMA-Factory arguments) and methods (overrides)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder; completed runs there are reused")
    parser.add_argument("--force", action="store_true", help="run again the runs that completed earlier")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this method or run (repeatable); others stay as is"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="set an argument of every run, over the suite (repeatable), e.g. --set max_steps=20 (value read as YAML)",
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the trained weights in DIR/runs/<run>/output (removed by default)",
    )


def run(args: argparse.Namespace) -> int:
    from .runner import run_bench
    from .suite import SuiteError, parse_override

    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        document = run_bench(
            args.suite,
            args.out,
            force=args.force,
            only=args.only,
            overrides=overrides,
            keep_models=args.keep_models,
            command=getattr(args, "command_line", None),
        )
    except SuiteError as error:
        print(f"blockllm-factory bench: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"blockllm-factory bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockllm-factory bench: interrupted; completed runs are kept and skipped next time", file=sys.stderr)
        return 130
    failed = [r["name"] for r in document["runs"] if r["status"] != "ok"]
    print(f"[bench] report: {args.out}/report.md ({len(document['runs']) - len(failed)} ok, {len(failed)} failed)")
    return 1 if failed else 0

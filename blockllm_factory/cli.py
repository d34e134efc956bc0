"""``blockllm-factory`` console script: a small dispatcher over sub-commands.

A sub-command is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; add one to
:data:`COMMANDS`. Modules are imported only to build the parser, so they must stay import-light (no torch at import).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from blockllm_factory import __version__

COMMANDS = {
    "bench": "blockllm_factory.bench.command",
    "compare": "blockllm_factory.bench.compare",
    "demo": "blockllm_factory.demo.command",
    "glue": "blockllm_factory.glue.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockllm-factory", description="BlockLLM for LLaMA-Factory")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    args.command_line = shlex.join(["blockllm-factory", *arguments])
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

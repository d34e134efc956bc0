"""``python -m blockllm_factory.demo build DIR`` and ``python -m blockllm_factory.demo summary OUTPUT_DIR``, the same
as ``blockllm-factory demo ...`` (:mod:`blockllm_factory.demo.command`)."""

from __future__ import annotations

import argparse
import sys

from blockllm_factory.demo import command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockllm_factory.demo", description=command.HELP)
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``blockllm-factory`` console script."""

import sys


def main(argv=None) -> int:
    print("blockllm-factory: no sub-commands yet", file=sys.stderr)
    return 2

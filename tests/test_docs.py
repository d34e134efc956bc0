"""The documentation's Python examples run as written."""

import re
from pathlib import Path

from helpers import ROOT

DOCS = ROOT / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_algorithm_api_example_trains(capsys):
    blocks = python_blocks(DOCS / "algorithm.md")
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/algorithm.md", "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", printed).groups())
    assert last < 0.5 * first

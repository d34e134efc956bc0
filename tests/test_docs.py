"""The documentation's Python examples run as written, and its argument table matches the settings."""

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


def test_integration_arguments_table_states_every_field_and_its_default():
    """docs/integration.md's table of `blockllm_*` arguments is written by hand: every field of the settings table is
    in it, with LLaMA-Factory's default, and nothing else."""
    from blockllm_factory.optim.settings import YAML_SETTINGS

    rows = {
        cells[1].strip("` "): cells[2].strip("` ")
        for line in (DOCS / "integration.md").read_text().splitlines()
        if line.startswith("| `blockllm_") and len(cells := line.split("|")) > 3
    }
    for setting in YAML_SETTINGS:
        default = setting.yaml_default
        expected = str(default).lower() if isinstance(default, bool) else str(default)
        assert rows.get(setting.field) == expected, (setting.field, rows.get(setting.field), expected)
    assert set(rows) == {setting.field for setting in YAML_SETTINGS}  # and no row for a field that is not there

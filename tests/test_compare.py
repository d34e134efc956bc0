"""``blockllm-factory compare``: the finished runs of several report folders in one set of tables (no training)."""

import json
from pathlib import Path

import pytest

from blockllm_factory import cli


def _run(folder: Path, method: str, rate: float, seed: int, curve: list[float], status: str = "ok") -> None:
    """A result.json as the bench writes it, with the fields compare reads."""
    name = f"{method}/learning_rate={rate}/seed={seed}"
    path = folder / "runs" / name / "result.json"
    path.parent.mkdir(parents=True)
    record = {
        "name": name,
        "method": method,
        "config": f"{method}/learning_rate={rate}",
        "seed": seed,
        "sweep": {"learning_rate": rate},
        "status": status,
        "eval_loss": curve[-1],
        "eval_curve": [[20 * (i + 1), loss] for i, loss in enumerate(curve)] + [[20 * len(curve), curve[-1]]],
        "eval_exact_match": 0.5,
        "peak_tracked_bytes": 100 * 2**20,
        "trains": f"what {method} trains",
    }
    path.write_text(json.dumps(record))


@pytest.fixture
def folders(tmp_path):
    suite, variant = tmp_path / "suite", tmp_path / "coverage"
    # The suite: blockllm's 1e-3 is best on seed 1 alone, but 3e-4 ran on three seeds, so 3e-4 is its best.
    for seed, curve in ((1, [2.0, 1.5]), (2, [2.2, 1.7]), (3, [2.1, 1.6])):
        _run(suite, "blockllm", 3e-4, seed, curve)
    _run(suite, "blockllm", 1e-3, 1, [1.9, 1.4])
    for seed, curve in ((1, [1.8, 1.4]), (2, [2.3, 1.5]), (3, [2.0, 1.3])):
        _run(suite, "lora", 3e-3, seed, curve)
    _run(suite, "lora", 1e-2, 1, [9.0, 9.0], status="failed")
    # The variant's folder: the same method run with other settings, and one run met again.
    for seed, curve in ((1, [1.9, 1.45]), (2, [2.0, 1.6])):
        _run(variant, "blockllm", 3e-4, seed, curve)
    return suite, variant


def test_compare_tables_best_rates_ranking_and_seed_by_seed_differences(folders, capsys):
    suite, variant = folders
    assert cli.main(["compare", str(suite), f"{variant}=coverage4", "--baseline", "blockllm"]) == 0
    out, err = capsys.readouterr()
    assert "left out" in err and "lora/learning_rate=0.01/seed=1" in err  # the failed run, named
    best = out.split("## Each variant at its best configuration")[1].split("##")[0]
    assert "| blockllm | learning_rate=0.0003 | 1, 2, 3 | 1.6000 ± 0.1000 [1.5000, 1.7000] | 2.1000 ± 0.1000" in best
    assert "| lora | learning_rate=0.003 | 1, 2, 3 | 1.4000 ± 0.1000 [1.3000, 1.5000] |" in best
    assert "| coverage4 | learning_rate=0.0003 | 1, 2 | 1.5250 ± 0.1061 [1.4500, 1.6000] |" in best
    ranking = out.split("## Ranking")[1].split("##")[0]
    assert "- step 20: coverage4 1.9500 < lora 2.0333 < blockllm 2.1000" in ranking
    assert "- step 40: lora 1.4000 < coverage4 1.5250 < blockllm 1.6000" in ranking
    assert "differs from the order at step 20" in ranking
    differences = out.split("minus blockllm (learning_rate=0.0003), seed by seed")[1]
    # lora minus blockllm, seed by seed: -0.1, -0.2, -0.3 at the end; the variant on its seeds 1 and 2 only.
    assert "| lora | learning_rate=0.003 | 1, 2, 3 | -0.2000, +0.1000, -0.1000" in differences
    assert "-0.1000, -0.2000, -0.3000 (mean -0.2000 ± 0.1000) |" in differences
    assert "| coverage4 | learning_rate=0.0003 | 1, 2 |" in differences
    assert "-0.0500, -0.1000 (mean -0.0750 ± 0.0354) |" in differences


def test_compare_writes_a_file_and_takes_a_run_met_twice_from_the_first_folder(folders, tmp_path, capsys):
    suite, _ = folders
    out = tmp_path / "tables" / "compare.md"
    assert cli.main(["compare", str(suite), str(suite), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "blockllm/learning_rate=0.0003/seed=1: taken from" in err
    text = out.read_text()
    assert text.count("| blockllm | learning_rate=0.0003 | 1 |") == 1  # not twice in "Every run"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["NOWHERE"], "is not a bench report folder (it has no runs/ folder)"),
        (["SUITE", "--baseline", "full"], "--baseline 'full': no such variant (variants: blockllm, lora)"),
        (["SUITE=defaults"], "holds runs of several methods (blockllm, lora); a label names the variant"),
    ],
)
def test_compare_refuses_what_it_cannot_compare_naming_it(folders, tmp_path, capsys, arguments, message):
    suite, _ = folders
    arguments = [a.replace("SUITE", str(suite)).replace("NOWHERE", str(tmp_path / "NOWHERE")) for a in arguments]
    assert cli.main(["compare", *arguments]) == 2
    assert message in capsys.readouterr().err

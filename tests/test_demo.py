"""The embedded default: the tiny Llama and demo data the project builds itself, and the README's demo recipe."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI, cli_env

from blockllm_factory.demo import data
from blockllm_factory.demo.assets import DATASETS, EVAL_EXAMPLES, SEED, STAMP_NAME, TRAIN_EXAMPLES, build

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "demo" / "tiny_llama_blockllm_sft.yaml"


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def assets(demo_assets):
    return demo_assets  # conftest.py's build, shared with tests/test_webui.py


def test_an_up_to_date_build_is_kept(assets):
    weights = assets.model_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert build(assets.root).model_dir == assets.model_dir
    assert weights.stat().st_mtime_ns == written  # same code and library versions: nothing rewritten


def test_a_stale_build_is_rebuilt_with_identical_bytes(assets, tmp_path):
    """One rebuild shows both: a build by other code is replaced, and building again gives the same files."""
    stale = tmp_path / "assets"
    shutil.copytree(assets.root, stale)
    (stale / STAMP_NAME).write_text("made by an older version\n")
    (stale / "model" / "model.safetensors").write_bytes(b"damaged")
    build(stale)
    digests = file_digests(assets.root)
    assert "model/model.safetensors" in digests and "data/demo_sft.json" in digests
    assert file_digests(stale) == digests
    assert not list(tmp_path.glob(".assets-*")), "the staging folder is left behind"


def test_every_dataset_is_registered_with_its_records(assets):
    info = json.loads((assets.dataset_dir / "dataset_info.json").read_text())
    assert sorted(info) == sorted(DATASETS)
    sizes = {"demo_sft_eval": EVAL_EXAMPLES}
    for name, entry in info.items():
        records = json.loads((assets.dataset_dir / entry["file_name"]).read_text())
        assert len(records) == sizes.get(name, TRAIN_EXAMPLES), name
        columns = entry.get("columns", {"prompt": "instruction", "query": "input", "response": "output"})
        for column in columns.values():
            assert all(column in record for record in records), f"{name}: column {column} missing"


def test_answers_are_right_and_rejected_answers_wrong():
    items = data.examples(TRAIN_EXAMPLES, seed=SEED)
    assert {instruction for instruction, *_ in items} >= {"Reverse the letters of the word.", "Add the two numbers."}
    for instruction, query, right, wrong in items:
        assert right != wrong, (instruction, query)
        if instruction == "Reverse the letters of the word.":
            assert right == query[::-1]
        elif instruction == "Add the two numbers.":
            a, b = query.split(" + ")
            assert int(right) == int(a) + int(b)
        elif instruction == "Which number is larger?":
            assert int(right) == max(int(n) for n in query.split(", "))
        elif instruction.startswith("What is the capital of"):
            assert right == data.CAPITALS[instruction.removeprefix("What is the capital of ").rstrip("?")]
        assert right in data.prose((instruction, query, right, wrong)), "the prose states the right answer"
    labels = [record["label"] for record in data.as_kto(items)]
    assert labels.count(True) == labels.count(False)


def test_the_model_and_tokenizer_load_and_fit_together(assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")

    records = json.loads((assets.dataset_dir / "demo_sft_eval.json").read_text())
    for record in records[:50]:
        text = f"Human: {record['instruction']}\n{record['input']}\nAssistant:{record['output']}"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
        assert len(ids) < 64  # the BPE learned the demo's words: short sequences keep the demo fast
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert torch.isfinite(loss)


def test_the_readme_demo_recipe_trains_and_reports_where_its_results_are(assets, tmp_path):
    """The demo recipe itself, shortened, through the real llamafactory-cli; then the demo's closing summary."""
    output_dir = tmp_path / "output"
    overrides = [
        f"model_name_or_path={assets.model_dir}",
        f"dataset_dir={assets.dataset_dir}",
        f"output_dir={output_dir}",
        "max_steps=30",
        "eval_steps=30",
        "logging_steps=5",
    ]
    result = subprocess.run(
        [str(CLI), "train", str(DEMO_RECIPE), *overrides],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    first_selection = json.loads((output_dir / "blockllm_selection.jsonl").read_text().splitlines()[0])
    assert first_selection["budget"] == pytest.approx(0.05 * first_selection["eligible"], abs=1)  # sparsity 0.95

    losses = [
        entry["loss"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses

    summary = subprocess.run(
        [sys.executable, "-m", "blockllm_factory.demo", "summary", str(output_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stdout + summary.stderr
    for what, name in [
        ("model", "model.safetensors"),
        ("loss plot", "training_loss.png"),
        ("selection log", "blockllm_selection.jsonl"),
        ("selection plot", "blockllm_selection.png"),
    ]:
        assert f"{what:<15}{output_dir}" in summary.stdout, what
        assert (output_dir / name).is_file(), name
    assert "MISSING" not in summary.stdout


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "blockllm_factory.demo"],
        [str(Path(sys.executable).with_name("blockllm-factory")), "demo"],  # the console script: the same sub-command
    ],
    ids=["python -m", "blockllm-factory"],
)
def test_the_summary_fails_when_a_result_is_missing(tmp_path, command):
    (tmp_path / "model.safetensors").write_bytes(b"")
    summary = subprocess.run([*command, "summary", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 1
    assert "loss plot" in summary.stdout and "MISSING" in summary.stdout
    assert f"{'model':<15}{tmp_path}" in summary.stdout

"""Every recipe parses with LLaMA-Factory's own parser (the one ``llamafactory-cli train`` runs), without training,
and says what the paper says; the benchmark suites agree with the recipes they restate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cli_env

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
# LLaMA-Factory training files; recipes/glue/ is the Trainer front's (blockllm-factory glue, tests/test_hf.py).
TRAIN_RECIPES = sorted(
    path for path in RECIPES.rglob("*.yaml") if not {"bench", "glue"} & set(path.relative_to(RECIPES).parts)
)
SUITES = sorted((RECIPES / "bench").glob("*.yaml"))
ALPACA = {method: RECIPES / f"llama2_alpaca_{method}.yaml" for method in ("blockllm", "galore", "lora", "badam")}
SIZES = ("60m", "130m", "350m")

# Runs each recipe through llamafactory-cli's argument path: sys.argv as the CLI leaves it after taking the
# command word, then get_train_args(), which reads the YAML and KEY=VALUE overrides and runs every parse-time check.
PARSE_SCRIPT = r"""
import json, sys
from llamafactory.hparams import get_train_args

results = {}
for path, overrides in json.loads(sys.argv[1]).items():
    sys.argv = ["llamafactory-cli", path, *overrides]
    try:
        model_args, data_args, training_args, finetuning_args, _ = get_train_args()
        results[path] = {"finetuning_type": finetuning_args.finetuning_type, "stage": finetuning_args.stage,
                         "learning_rate": training_args.learning_rate}
    except BaseException as error:  # SystemExit included: a refused recipe must not end the loop
        results[path] = {"error": f"{type(error).__name__}: {error}"}
print("RESULTS " + json.dumps(results))
"""


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cpu_overrides(recipe: dict) -> list[str]:
    """What a CPU-only machine must change for the parser to accept a GPU recipe; nothing on a bf16 GPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return []
    # LLaMA-Factory refuses pure_bf16 and transformers refuses bf16 without a bf16 GPU, before anything else.
    return [f"{key}=false" for key in ("pure_bf16", "bf16") if recipe.get(key)]


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    requests = {}
    for path in TRAIN_RECIPES:
        recipe = load(path)
        overrides = cpu_overrides(recipe)
        if recipe.get("deepspeed"):
            # DeepSpeed configs parse only under torchrun (FORCE_TORCHRUN=1); here their file must exist.
            assert (ROOT / recipe["deepspeed"]).is_file(), f"{path.name}: {recipe['deepspeed']} not found"
            overrides.append("deepspeed=null")
        requests[str(path.relative_to(ROOT))] = overrides
    result = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, json.dumps(requests)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-4000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


def test_the_recipes_the_issues_ask_for_exist():
    names = {str(path.relative_to(RECIPES)) for path in TRAIN_RECIPES}
    assert {f"llama2_alpaca_{method}.yaml" for method in ALPACA} <= names
    assert {f"llama_{size}_c4_{method}.yaml" for size in SIZES for method in ("blockllm", "galore")} <= names
    assert "demo/tiny_llama_blockllm_sft.yaml" in names
    assert {path.name for path in SUITES} >= {"tiny_cpu.yaml", "llama2_7b_alpaca.yaml", "llama_c4_pretrain.yaml"}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda path: str(path.relative_to(RECIPES)))
def test_every_recipe_parses_with_llamafactory(parsed, recipe):
    result = parsed[str(recipe.relative_to(ROOT))]
    assert "error" not in result, result.get("error")
    assert result["finetuning_type"] == load(recipe)["finetuning_type"]


def test_the_alpaca_recipe_holds_the_papers_appendix_a6():
    recipe = load(ALPACA["blockllm"])
    assert recipe["finetuning_type"] == "blockllm"
    assert (recipe["blockllm_sparsity"], recipe["blockllm_patience"]) == (0.95, 100)
    assert (recipe["num_train_epochs"], recipe["per_device_train_batch_size"]) == (3.0, 8)
    assert (recipe["gradient_accumulation_steps"], recipe["weight_decay"]) == (2, 0.01)
    assert recipe["lr_scheduler_type"] == "cosine"  # HF's cosine decays to 0, the paper's lr_min = 0
    assert recipe["disable_gradient_checkpointing"] is False
    assert "learning rate" in ALPACA["blockllm"].read_text().lower()  # the lost value is explained


def test_the_alpaca_baselines_share_every_setting_but_their_method():
    method_keys = {"finetuning_type", "output_dir", "learning_rate", "pure_bf16", "bf16", "optim"}
    reference = {key: value for key, value in load(ALPACA["blockllm"]).items() if not key.startswith("blockllm_")}
    for method, path in ALPACA.items():
        recipe = load(path)
        own = {key for key in recipe if key.startswith(("blockllm_", "galore_", "lora_", "badam_", "use_"))}
        shared = {key: value for key, value in recipe.items() if key not in own}
        assert {k: v for k, v in shared.items() if k not in method_keys} == {
            k: v for k, v in reference.items() if k not in method_keys
        }, method
    assert (load(ALPACA["galore"])["galore_rank"], load(ALPACA["lora"])["lora_rank"]) == (8, 8)
    assert load(ALPACA["badam"])["badam_switch_interval"] == 100
    assert load(ALPACA["galore"])["optim"] == "adamw_torch"  # transformers 5's fused default has no GaLore variant


@pytest.mark.parametrize("size", SIZES)
def test_the_pretraining_recipes_hold_appendix_a7(size):
    blockllm = load(RECIPES / f"llama_{size}_c4_blockllm.yaml")
    galore = load(RECIPES / f"llama_{size}_c4_galore.yaml")
    for recipe in (blockllm, galore):
        assert recipe["train_from_scratch"] is True and recipe["stage"] == "pt"
        assert recipe["model_name_or_path"] == f"recipes/models/llama_{size}"
        assert recipe["lr_scheduler_type"] == "cosine_with_min_lr"
        assert recipe["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}  # cosine down to 10%
        assert recipe["cutoff_len"] == 256
        assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] == 512
    assert (blockllm["learning_rate"], blockllm["warmup_steps"]) == (1.0e-3, 0)  # no warmup for BlockLLM
    assert blockllm["blockllm_include_embeddings"] is True
    assert galore["warmup_steps"] == 0.1 and galore["use_galore"] is True
    assert blockllm["max_steps"] == galore["max_steps"] == {"60m": 10000, "130m": 20000, "350m": 60000}[size]


@pytest.mark.parametrize("size, parameters", [("60m", 58_073_600), ("130m", 134_105_856), ("350m", 367_969_280)])
def test_the_model_configs_build_llamas_of_their_named_size(size, parameters):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(RECIPES / "models" / f"llama_{size}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert config.vocab_size == 32000 and config.eos_token_id == 1  # the T5 tokenizer's ids (models/README.md)


def test_the_demo_recipe_is_blockllm_on_the_embedded_assets():
    recipe = load(RECIPES / "demo" / "tiny_llama_blockllm_sft.yaml")
    assert recipe["finetuning_type"] == "blockllm" and recipe["blockllm_sparsity"] == 0.95
    assert recipe["model_name_or_path"] == "runs/demo/assets/model"
    assert recipe["dataset_dir"] == "runs/demo/assets/data" and recipe["use_cpu"] is True
    assert recipe["plot_loss"] is True  # the demo ends by showing the loss plot


def test_every_suite_loads_and_names_only_known_arguments():
    from blockllm_factory.bench.suite import load_suite

    for path in SUITES:
        suite = load_suite(path)
        assert all(run.problem is None for run in suite.runs), [(run.name, run.problem) for run in suite.runs]
        kinds = {run.kind for run in suite.runs}
        assert "blockllm" in kinds, path.name
        # A suite that grades goals compares with full fine-tuning; an ablation of BlockLLM alone (patience_length)
        # compares its own settings.
        assert "full" in kinds or not suite.goals, path.name


def _same_settings(run_args: dict, recipe: dict, name: str) -> None:
    harness = {"output_dir", "do_train", "report_to", "include_num_input_tokens_seen"}
    for key, value in recipe.items():
        if key not in harness:
            assert run_args.get(key) == value, f"{name}: {key} is {run_args.get(key)!r}, the recipe says {value!r}"
    extra = set(run_args) - set(recipe) - harness
    # The pretraining suite keeps GaLore's per-size rank with the group; only GaLore reads it.
    assert extra <= {"galore_rank"}, f"{name}: the suite sets {sorted(extra)} that the recipe does not"


def test_the_alpaca_suite_restates_the_alpaca_recipes():
    from blockllm_factory.bench.suite import load_suite

    runs = {run.name: run for run in load_suite(RECIPES / "bench" / "llama2_7b_alpaca.yaml").runs}
    for method, path in ALPACA.items():
        _same_settings(runs[method].args, load(path), method)


def test_the_pretraining_suite_restates_the_c4_recipes():
    from blockllm_factory.bench.suite import load_suite

    runs = {run.name: run for run in load_suite(RECIPES / "bench" / "llama_c4_pretrain.yaml").runs}
    for size in SIZES:
        for method in ("blockllm", "galore"):
            _same_settings(runs[f"{size}/{method}"].args, load(RECIPES / f"llama_{size}_c4_{method}.yaml"), size)

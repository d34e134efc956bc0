"""``finetuning_type: blockllm`` through the real, unmodified ``llamafactory-cli`` on a tiny Llama (CPU, a few steps).

Each run writes a plain model to ``output_dir``; that only the blocks BlockLLM selected (per its selection log) changed
is what tells BlockLLM trained rather than LLaMA-Factory's default AdamW, which would move every weight.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STAGES = {
    "pt": "tiny_pt",
    "sft": "tiny_sft",
    "rm": "tiny_pairwise",
    "dpo": "tiny_pairwise",
    "kto": "tiny_kto",
}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def selection_log(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "blockllm_selection.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def changed_names(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name].float(), after[name].float())}


def selected_names(records: list[dict], prefix: str = "") -> set[str]:
    """The tensors of the selected blocks (a row group ``q_proj.weight[0:32]`` belongs to ``q_proj.weight``)."""
    return {name.partition("[")[0].removeprefix(prefix) for record in records for name in record["names"]}


def assert_ok(result) -> None:
    assert result.returncode == 0, result.log[-6000:]


@pytest.fixture(scope="module")
def stage_run(llamafactory_cli, tmp_path_factory):
    """``stage_run(stage)``: one short run of that stage (sparsity 0.5, 3 steps), made once per module; the export test
    exports the sft run."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}

    def run(stage: str):
        if stage not in runs:
            settings = {"stage": stage, "dataset": STAGES[stage], "max_steps": 3, "blockllm_sparsity": 0.5}
            config = llamafactory_cli.config(root / stage, plot_loss=True, **settings)
            runs[stage] = llamafactory_cli.run("train", config, root, stage)
            runs[stage].output_dir = root / stage
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_trains_only_selected_blocks_and_saves_a_plain_model(stage, stage_run, tiny_llamafactory_assets):
    from transformers import AutoModelForCausalLM

    result = stage_run(stage)
    assert_ok(result)
    out = result.output_dir
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert "Fine-tuning method: BlockLLM" in result.log

    records = selection_log(out)
    assert records[0]["reason"] == "initial" and records[0]["step"] == 1
    assert all(0 < record["coordinates"] <= record["budget"] < record["eligible"] for record in records)
    assert (out / "blockllm_selection.png").stat().st_size > 0

    # The reward model's blocks are named inside the value-head wrapper; its saved model is the plain one.
    changed = changed_names(weights(tiny_llamafactory_assets.model_dir), weights(out))
    selected = selected_names(records, prefix="pretrained_model." if stage == "rm" else "")
    assert changed, "training changed no weight"
    assert changed <= selected, f"weights outside BlockLLM's selection changed: {sorted(changed - selected)}"
    # The default `blockllm_include_embeddings: auto`, in one process with head blocks: the embeddings and the head are
    # blocks, their gradients kept as rows (optim/rows.py); they changed only where selected (above).
    assert "embeddings and head as row blocks (`blockllm_include_embeddings: auto`)" in result.log
    assert "gradients (as rows for " in result.log

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if stage == "rm":
        assert (out / "value_head.safetensors").exists()


def test_bad_value_is_refused_by_name_before_anything_is_written(llamafactory_train):
    # The refused values themselves are checked in process against docs/bad_inputs.md (test_reliability.py); this one
    # checks what only the real CLI shows: the run stops at parsing, before a model loads or a file is written.
    result = llamafactory_train({"blockllm_sparsity": 1.5}, name="refused")
    assert result.returncode != 0
    assert "`blockllm_sparsity` must be a number in [0, 1)" in result.stderr
    assert "Traceback" in result.stderr  # the parse error itself, not a later failure
    assert "trainable params" not in result.log  # LLaMA-Factory's line after a model loads
    assert not result.output_dir.exists() or not any(result.output_dir.iterdir())


# One resumed run for the states that are not fp32 (the fp32 resume of a reselecting run is
# tests/test_reliability.py::test_resumed_run_ends_bit_identical_to_the_unbroken_one, selection log included):
# 8-bit moments (they need vectors of >= 4096 entries: the tiny model's embeddings and head have them), norms in every
# selection, and patience as a share of the run (0.34 of the 6 steps: 2 steps).
RESUMED_STATES = {
    "optim": "adamw_bnb_8bit",
    "blockllm_include_embeddings": True,
    "blockllm_sparsity": 0.3,
    "blockllm_norms": "always",
    "blockllm_patience": 0.34,
}


def test_resume_from_checkpoint_continues_exactly_with_8bit_moments_norms_and_a_patience_share(
    llamafactory_cli, tmp_path
):
    common = {
        "max_steps": 6,
        "gradient_accumulation_steps": 2,
        "save_strategy": "steps",
        "save_steps": 3,
        **RESUMED_STATES,
    }
    unbroken = llamafactory_cli.config(tmp_path / "unbroken", **common)
    assert_ok(llamafactory_cli.run("train", unbroken, tmp_path, "unbroken"))
    checkpoint = tmp_path / "unbroken" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    saved_states = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"].values()
    quantized = [state for state in saved_states if "exp_avg_q" in state]
    assert quantized and all(state["exp_avg_q"].dtype == torch.uint8 for state in quantized)

    resumed = llamafactory_cli.config(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **common)
    result = llamafactory_cli.run("train", resumed, tmp_path, "resumed")
    assert_ok(result)
    assert "Resuming training from checkpoint" in result.log
    # the share is resolved against the whole run, not what is left
    assert "`blockllm_patience: 0.34` of 6 optimizer steps is 2 steps" in result.log

    final, again = weights(tmp_path / "unbroken"), weights(tmp_path / "resumed")
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    # Same selections, including those made after the checkpoint, from the restored loss window and probe state.
    records = selection_log(tmp_path / "resumed")
    assert records == selection_log(tmp_path / "unbroken")
    # norms: always (the norm policy test below runs `frozen`)
    assert "norms always, budget" in result.log
    norm_weights = {name for name in final if "norm" in name}
    assert len(norm_weights) == 5  # two per layer and the final one
    assert all(norm_weights <= set(record["names"]) for record in records)
    changed = changed_names(weights(llamafactory_cli.assets.model_dir), final)
    assert norm_weights <= changed and changed - norm_weights, "the norms and other weights train"


ON_GPU = {"use_cpu": False}  # the runs of the "cuda" cases (tests/test_cuda.py has the other CUDA tests)
GPU_ENV = {"CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def test_gradient_checkpointing_gives_the_same_training(device, llamafactory_train):
    # The exact probe (patience 1: it runs after every non-falling loss) makes every block require grad for a step.
    placement, env = (ON_GPU, GPU_ENV) if device == "cuda" else ({}, {})
    settings = {
        **placement,
        "blockllm_sparsity": 0.5,
        "blockllm_patience": 1,
        "blockllm_probe": "exact",
        "max_steps": 5,
    }
    checkpointed = llamafactory_train(settings, name="checkpointed", **env)
    plain = llamafactory_train({**settings, "disable_gradient_checkpointing": True}, name="plain", **env)
    assert_ok(checkpointed)
    assert_ok(plain)
    assert "Gradient checkpointing enabled." in checkpointed.log
    assert "Gradient checkpointing enabled." not in plain.log

    # Checkpointed blocks recompute their forward in backward; selected blocks must still get their gradients.
    with_gc, without_gc = weights(checkpointed.output_dir), weights(plain.output_dir)
    for name in with_gc:
        torch.testing.assert_close(with_gc[name], without_gc[name], msg=name)
    records = selection_log(checkpointed.output_dir)
    if device == "cuda":  # what ran on the H100 (docs/benchmarks.md): the same blocks were selected
        assert selected_names(records) == selected_names(selection_log(plain.output_dir))
        return
    assert records == selection_log(plain.output_dir)
    assert any(record["reason"] != "initial" for record in records)


def save_in_dtype(source: Path, target: Path, dtype: torch.dtype) -> Path:
    """Real checkpoints are stored in half precision, and LLaMA-Factory loads them as stored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.mark.parametrize(("precision", "master"), [("bf16", "compensated"), ("fp16", "fp32")])
def test_mixed_precision_keeps_half_weights_and_masters_only_for_the_selection(
    precision, master, llamafactory_train, tiny_llamafactory_assets, tmp_path
):
    """Measured inside the run from the live tensors (the benchmark harness's callback): weights at 2 bytes each,
    masters for at most the budget (fp32: 4 bytes a coordinate; `compensated`: 2, in the weights' dtype), gradients
    within the budget plus one tensor."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    half_model = save_in_dtype(tiny_llamafactory_assets.model_dir, tmp_path / f"{precision}_model", dtype)
    metrics = tmp_path / f"{precision}_metrics.json"
    result = llamafactory_train(
        {
            precision: True,
            "blockllm_sparsity": 0.5,
            "blockllm_master": master,
            "max_steps": 3,
            "model_name_or_path": str(half_model),
        },
        name=precision,
        BLOCKLLM_FACTORY_BENCH_OUT=str(metrics),
    )
    assert_ok(result)
    assert f"compute dtype: {dtype}" in result.log
    assert "trainable weights stay in half precision" in result.log
    assert f"{master} masters (for half-precision weights)" in result.log
    assert all(tensor.dtype == dtype for tensor in weights(result.output_dir).values())
    changed = changed_names(weights(half_model), weights(result.output_dir))
    assert changed and changed <= selected_names(selection_log(result.output_dir))

    measured = json.loads(metrics.read_text(encoding="utf-8"))
    budget = selection_log(result.output_dir)[0]["budget"]
    assert measured["parameter_bytes"] == 2 * measured["total_parameters"]  # no fp32 copy of the model
    assert 0 < measured["master_weight_bytes"] <= (2 if master == "compensated" else 4) * budget + 64
    largest = 2 * max(tensor.numel() for tensor in weights(tiny_llamafactory_assets.model_dir).values())
    gradient_element = 2 if precision == "bf16" else 4  # fp16's compact gradients are fp32 (for a GradScaler)
    assert 0 < measured["gradient_bytes"] <= gradient_element * (budget + 1) + largest


def test_exported_blockllm_model_equals_the_trained_one(stage_run, llamafactory_cli, tmp_path):
    trained = stage_run("sft")
    assert_ok(trained)
    export = {
        "model_name_or_path": str(trained.output_dir),
        "template": "default",
        "finetuning_type": "blockllm",
        "export_dir": str(tmp_path / "exported"),
        "export_device": "cpu",
        "export_size": 1,
    }
    result = llamafactory_cli.run("export", export, tmp_path, "export")
    assert_ok(result)
    original, exported = weights(trained.output_dir), weights(tmp_path / "exported")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name].float(), exported[name].float()) for name in original)


LOSS_FEED_SCRIPT = """
import json, sys
import torch
from transformers import LlamaForCausalLM
from blockllm_factory.optim import BlockLLM

recorded, forwards = [], []
original_record_loss = BlockLLM.record_loss

def record_loss(self, value):
    recorded.append(float(value))
    return original_record_loss(self, value)

def count_forward(module, args, output):
    if isinstance(module, LlamaForCausalLM) and module.training:
        forwards.append(1)

BlockLLM.record_loss = record_loss
torch.nn.modules.module.register_module_forward_hook(count_forward)
from llamafactory.train.tuner import run_exp
run_exp(json.loads(sys.argv[1]))
with open(sys.argv[2], "w") as file:
    json.dump({"recorded": recorded, "forwards": len(forwards)}, file)
"""


def test_loss_reaches_record_loss_once_per_step_averaged_over_micro_steps(llamafactory_cli, tmp_path):
    steps, accumulation = 3, 3
    config = llamafactory_cli.config(
        tmp_path / "out", max_steps=steps, gradient_accumulation_steps=accumulation, blockllm_sparsity=0.5
    )
    report = tmp_path / "report.json"
    result = llamafactory_cli.python(LOSS_FEED_SCRIPT, tmp_path, argv=[json.dumps(config), str(report)])
    assert_ok(result)
    seen = json.loads(report.read_text())
    logged = [
        entry["loss"]
        for entry in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    # One value per optimizer step, equal to the step's mean loss that the Trainer logs; no extra forward pass.
    assert len(seen["recorded"]) == steps == len(logged)
    assert seen["recorded"] == pytest.approx(logged, rel=1e-6)
    assert seen["forwards"] == steps * accumulation


PURE_BF16_SCRIPT = """
import json, sys
import llamafactory.hparams.parser as parser

parser.is_torch_bf16_gpu_available = lambda: True  # LLaMA-Factory asks for a GPU; CPUs compute in bf16 too
from llamafactory.train.tuner import run_exp
run_exp(json.loads(sys.argv[1]))
"""


def test_pure_bf16_keeps_bf16_weights_and_trains_the_selection(llamafactory_cli, tiny_llamafactory_assets, tmp_path):
    bf16_model = save_in_dtype(tiny_llamafactory_assets.model_dir, tmp_path / "bf16_model", torch.bfloat16)

    config = llamafactory_cli.config(
        tmp_path / "out", model_name_or_path=str(bf16_model), pure_bf16=True, max_steps=3, blockllm_sparsity=0.5
    )
    result = llamafactory_cli.python(PURE_BF16_SCRIPT, tmp_path, argv=[json.dumps(config)])
    assert_ok(result)
    assert "remaining trainable params in half precision" in result.log
    trained = weights(tmp_path / "out")
    assert {tensor.dtype for tensor in trained.values()} == {torch.bfloat16}
    changed = changed_names(weights(bf16_model), trained)
    assert changed and changed <= selected_names(selection_log(tmp_path / "out"))


def test_frozen_norms_never_train(llamafactory_train, tiny_llamafactory_assets):
    """`blockllm_norms: frozen` (`always` is checked on the resumed run above: norms in every selection, trained)."""
    result = llamafactory_train(
        {"max_steps": 4, "blockllm_sparsity": 0.9, "blockllm_patience": 1, "blockllm_norms": "frozen"}, name="frozen"
    )
    assert_ok(result)
    assert "norms frozen, budget" in result.log
    before = weights(tiny_llamafactory_assets.model_dir)
    norm_weights = {name for name in before if "norm" in name}
    assert len(norm_weights) == 5  # two per layer and the final one
    changed = changed_names(before, weights(result.output_dir))
    assert not norm_weights & selected_names(selection_log(result.output_dir)) and not norm_weights & changed
    assert changed - norm_weights, "no other weight trained"


def test_patience_as_a_share_of_a_run_given_in_epochs(llamafactory_train):
    # No max_steps: the Trainer computes the run's steps from the epochs and the data before it creates the optimizer.
    # The reselection settings ride along: a share of the run resolved the same way, and a warm-up, both logged.
    overrides = {"blockllm_patience": 0.25, "blockllm_reselect_until": 0.5, "blockllm_reselect_warmup": 2}
    result = llamafactory_train({"max_steps": -1, "num_train_epochs": 1, **overrides}, name="share")
    assert_ok(result)
    (total,) = {
        int(steps.replace(",", "")) for steps in re.findall(r"Total optimization steps = ([\d,]+)", result.log)
    }
    steps = round(0.25 * total)
    assert total > 4
    assert f"`blockllm_patience: 0.25` of {total} optimizer steps is {steps} steps" in result.log
    assert f"Using BlockLLM optimizer: sparsity 0.95, patience {steps}," in result.log
    until = round(0.5 * total)
    assert f"`blockllm_reselect_until: 0.5` of {total} optimizer steps is {until} steps" in result.log
    assert f"reselections until step {until}, warm-up after reselection 2 steps," in result.log

"""The CUDA paths, through the real ``llamafactory-cli`` / ``run_exp`` on the tiny Llama placed on the GPU.

Marked ``cuda``: conftest.py deselects them where torch sees no CUDA device (CI's CPU machine), and says so in the
summary; on a GPU machine ``pytest -m cuda tests`` runs only these. Nothing here replaces LLaMA-Factory's own GPU
checks (unlike tests/test_integration.py's CPU stand-in for pure bf16, which has to). The fp16 loss-scaler test also
runs on CPU, where the Trainer's GradScaler works too; the gradient-checkpointing test has a "cuda" case in
tests/test_integration.py.
"""

import json
import sys

import pytest
import torch
from helpers import run_logged
from test_integration import (
    GPU_ENV,
    ON_GPU,
    assert_ok,
    changed_names,
    save_in_dtype,
    selected_names,
    selection_log,
    weights,
)


@pytest.mark.cuda
def test_pure_bf16_on_cuda_through_the_cli(llamafactory_train, tiny_llamafactory_assets, tmp_path):
    """LLaMA-Factory's own check (``is_torch_bf16_gpu_available``) passes on the GPU: bf16 weights, no fp32 copy,
    only the selection trains, on ``cuda``."""
    bf16_model = save_in_dtype(tiny_llamafactory_assets.model_dir, tmp_path / "bf16_model", torch.bfloat16)
    metrics = tmp_path / "metrics.json"
    result = llamafactory_train(
        {**ON_GPU, "model_name_or_path": str(bf16_model), "pure_bf16": True, "max_steps": 4, "blockllm_sparsity": 0.5},
        name="pure_bf16",
        BLOCKLLM_FACTORY_BENCH_OUT=str(metrics),
        **GPU_ENV,
    )
    assert_ok(result)
    assert "remaining trainable params in half precision" in result.log
    measured = json.loads(metrics.read_text(encoding="utf-8"))
    assert measured["device"].startswith("cuda") and measured["peak_memory_source"] == "cuda_max_memory_allocated"
    assert measured["parameter_bytes"] == 2 * measured["total_parameters"]  # no fp32 copy of the model
    trained = weights(result.output_dir)
    assert {tensor.dtype for tensor in trained.values()} == {torch.bfloat16}
    changed = changed_names(weights(bf16_model), trained)
    assert changed and changed <= selected_names(selection_log(result.output_dir))


FP16_POISON_SCRIPT = """
import json, sys
import torch
from transformers import TrainerCallback
from llamafactory.train.tuner import run_exp

POISONED_STEP = int(sys.argv[3])


def blockllm(optimizer):
    while optimizer is not None and type(optimizer).__name__ != "BlockLLM":
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class Recorder(TrainerCallback):
    '''Fills one trainable tensor's gradient with inf in one step; records per step what changed and the skips.'''

    def __init__(self):
        self.records, self.handle, self.before = [], None, {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before = {name: param.detach().clone() for name, param in model.named_parameters()}
        self.skipped_before = blockllm(optimizer).skipped_steps
        if state.global_step == POISONED_STEP:
            # A weight whose gradient autograd delivers (the embeddings' reach BlockLLM as rows: tests/test_rows.py).
            param = next(param for name, param in model.named_parameters()
                         if param.requires_grad and "embed" not in name and "lm_head" not in name)
            self.handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        params = dict(model.named_parameters())
        self.records.append({
            "step": state.global_step - 1,
            "changed": sorted(name for name, param in params.items() if not torch.equal(param, self.before[name])),
            "skipped": blockllm(optimizer).skipped_steps - self.skipped_before,
            "devices": sorted({str(param.device) for param in params.values()}),
            "dtypes": sorted({str(param.dtype) for param in params.values()}),
            "finite": all(bool(torch.isfinite(param).all()) for param in params.values()),
        })


recorder = Recorder()
run_exp(json.loads(sys.argv[1]), callbacks=[recorder])
with open(sys.argv[2], "w") as file:
    json.dump(recorder.records, file)
"""


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def test_fp16_grad_scaler_skips_an_inf_step_through_the_trainer(
    device, llamafactory_cli, tiny_llamafactory_assets, tmp_path
):
    """fp16 weights under the Trainer's GradScaler: a step whose gradient holds inf is skipped by the scaler,
    BlockLLM is told (``skipped_steps``) and changes nothing; the other steps train. The scaler may also skip steps
    while it finds its scale: every skip must leave the weights alone."""
    fp16_model = save_in_dtype(tiny_llamafactory_assets.model_dir, tmp_path / "fp16_model", torch.float16)
    poisoned_step = 3
    placement = ON_GPU if device == "cuda" else {}
    config = llamafactory_cli.config(
        tmp_path / "out",
        **placement,
        model_name_or_path=str(fp16_model),
        fp16=True,
        max_steps=8,
        blockllm_sparsity=0.5,
    )
    report = tmp_path / "steps.json"
    result = run_logged(
        [sys.executable, "-c", FP16_POISON_SCRIPT, json.dumps(config), str(report), str(poisoned_step)],
        tmp_path,
        600,
        **(GPU_ENV if device == "cuda" else {}),
    )
    assert_ok(result)
    assert "trainable weights stay in half precision" in result.log
    records = json.loads(report.read_text(encoding="utf-8"))
    assert [record["step"] for record in records] == list(range(8))
    expected_device = "cuda:0" if device == "cuda" else "cpu"
    assert all(record["devices"] == [expected_device] and record["dtypes"] == ["torch.float16"] for record in records)
    assert all(record["finite"] for record in records)
    # The first step measures every block and makes the first selection; it updates nothing (docs/algorithm.md).
    assert records[0]["changed"] == [] and records[0]["skipped"] == 0
    poisoned = records[poisoned_step]
    assert poisoned["skipped"] == 1 and poisoned["changed"] == []
    for record in records[1:]:
        assert record["skipped"] in (0, 1)
        assert (record["changed"] == []) == (record["skipped"] == 1), record
    assert sum(record["skipped"] == 0 for record in records[1:]) >= 3  # it trains once the scale fits


@pytest.mark.cuda
def test_sdpa_attention_on_cuda_trains_like_eager(llamafactory_train, tiny_llamafactory_assets):
    settings = {**ON_GPU, "blockllm_sparsity": 0.5, "max_steps": 4}
    sdpa = llamafactory_train({**settings, "flash_attn": "sdpa"}, name="sdpa", **GPU_ENV)
    eager = llamafactory_train({**settings, "flash_attn": "disabled"}, name="eager", **GPU_ENV)
    assert_ok(sdpa)
    assert_ok(eager)
    assert "Using torch SDPA for faster training and inference." in sdpa.log
    assert "Using vanilla attention implementation." in eager.log
    initial = weights(tiny_llamafactory_assets.model_dir)
    with_sdpa, with_eager = weights(sdpa.output_dir), weights(eager.output_dir)
    changed = changed_names(initial, with_sdpa)
    assert changed and changed <= selected_names(selection_log(sdpa.output_dir))
    assert changed == changed_names(initial, with_eager)
    for name in with_sdpa:  # the two kernels differ in rounding only
        torch.testing.assert_close(with_sdpa[name], with_eager[name], rtol=1e-3, atol=1e-4, msg=name)

"""Frozen layers on the gradient path are checkpointed (patches/layer_checkpointing.py): whom the patch affects, and
through the real CLI, that a BlockLLM run's all-storage peak falls with it while its losses stay bit-identical."""

import functools
import json
import shutil

import pytest
import torch
from helpers import run_cli, tiny_config

from blockllm_factory.patches import layer_checkpointing
from blockllm_factory.patches.layer_checkpointing import SWITCH_ENV


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, hidden):
        return self.linear(hidden).relu()


def _wrapped(monkeypatch, env: str | None):
    """LLaMA-Factory's function, patched, around a recording checkpoint function."""
    from llamafactory.model.model_utils import checkpointing

    if env is None:
        monkeypatch.delenv(SWITCH_ENV, raising=False)
    else:
        monkeypatch.setenv(SWITCH_ENV, env)
    checkpointed = []

    def checkpoint(func, *args, **kwargs):
        checkpointed.append(func)
        return func(*args, **kwargs)

    # the hook patched the module when LLaMA-Factory imported it
    assert getattr(checkpointing, "_blockllm_factory_layer_checkpointing", False)
    return checkpointing.get_custom_gradient_checkpointing_func(checkpoint), checkpointed


@pytest.mark.parametrize(
    ("env", "marked", "expected"),
    [(None, True, True), (None, False, False), ("1", False, True), ("0", True, False)],
    ids=["blockllm", "other-method", "switch-on", "switch-off"],
)
def test_a_frozen_layer_whose_input_requires_grad_is_checkpointed_only_where_asked(monkeypatch, env, marked, expected):
    func, checkpointed = _wrapped(monkeypatch, env)
    layer = _Layer().requires_grad_(False)
    if marked:
        layer_checkpointing.mark(layer)
    hidden = torch.randn(2, 4, requires_grad=True)
    func(functools.partial(layer.__call__), hidden)
    assert bool(checkpointed) is expected
    # LLaMA-Factory's own rule is kept everywhere: a trainable layer is checkpointed, a layer off the gradient path
    # is not; decided at each call (BlockLLM flips requires_grad between steps).
    checkpointed.clear()
    func(layer.__call__, torch.randn(2, 4))
    assert checkpointed == []
    layer.requires_grad_(True)
    func(layer.__call__, torch.randn(2, 4))
    assert len(checkpointed) == 1


def _six_layer_model(assets, folder):
    """The tiny test model's tokenizer with six layers: room for frozen layers above the selected ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(assets.model_dir, folder)
    config = LlamaConfig.from_pretrained(folder)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 6, 64, 128
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_checkpointing_frozen_layers_lowers_the_peak_and_keeps_the_losses(tiny_llamafactory_assets, tmp_path):
    model = _six_layer_model(tiny_llamafactory_assets, tmp_path / "model")
    figures = {}
    for name, switch in (("shipped", "0"), ("checkpointed", "auto")):
        # whole tensors at sparsity 0.95: a few attention tensors of the lower layers train, the top layers are frozen
        config = tiny_config(
            tiny_llamafactory_assets,
            tmp_path / name,
            model_name_or_path=str(model),
            cutoff_len=128,
            max_steps=3,
            blockllm_sparsity=0.95,
            blockllm_block_size=0,
        )
        out = tmp_path / name / "metrics.json"
        result = run_cli("train", config, tmp_path, name, BLOCKLLM_FACTORY_BENCH_OUT=str(out), **{SWITCH_ENV: switch})
        assert result.returncode == 0, result.log[-3000:]
        figures[name] = json.loads(out.read_text())
    shipped, checkpointed = figures["shipped"], figures["checkpointed"]
    assert checkpointed["loss_curve"] == shipped["loss_curve"] and len(shipped["loss_curve"]) == 3  # bit-identical
    assert checkpointed["peak_storage_bytes"] < shipped["peak_storage_bytes"]
    saved = {name: run["peak_composition"]["activations"] for name, run in figures.items()}
    assert saved["checkpointed"] < saved["shipped"]
    assert shipped["peak_storage_bytes"] - checkpointed["peak_storage_bytes"] == pytest.approx(
        shipped["untracked_bytes"] - checkpointed["untracked_bytes"]
    )

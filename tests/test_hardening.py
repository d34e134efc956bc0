"""What happens when BlockLLM meets the rest of LLaMA-Factory: other launchers and loaders, PPO, Ray, silent defaults.

Each case either runs or is refused before a model loads, with the message documented in docs/bad_inputs.md (the
refusals are triggered by :func:`documented_triggers`, which tests/test_reliability.py adds to its cases); warnings are
documented there too and checked here. The launches that a user types (``accelerate launch`` with an FSDP config,
``FORCE_TORCHRUN=1`` with a ZeRO-3 config, stage ppo) go through the real ``llamafactory-cli``.
"""

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import CLI, ROOT, bad_inputs, documented_pattern, parse_args, run_logged, tiny_config

ACCELERATE = Path(sys.executable).with_name("accelerate")


# ------------------------------------------------------------------------------------------------ documented refusals
def _without(module, name: str) -> SimpleNamespace:
    return SimpleNamespace(**{key: value for key, value in vars(module).items() if key != name})


def _surface_missing():
    import llamafactory.train.trainer_utils as trainer_utils

    from blockllm_factory.patches._surfaces import check_surfaces

    check_surfaces("llamafactory.train.trainer_utils", _without(trainer_utils, "create_custom_optimizer"))


def _surface_changed():
    import llamafactory.model.adapter as adapter

    from blockllm_factory.patches._surfaces import check_surfaces

    def init_adapter(config, model, model_args, finetuning_args):  # as if a release had dropped is_trainable
        return model

    check_surfaces("llamafactory.model.adapter", SimpleNamespace(**{**vars(adapter), "init_adapter": init_adapter}))


def _launch(monkeypatch, env: dict[str, str], **finetuning):
    from blockllm_factory.patches.launch import check_launch

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_launch(
        SimpleNamespace(use_unsloth=False),
        SimpleNamespace(use_mca=False, **finetuning),
        SimpleNamespace(deepspeed=None),
    )


def _ray(assets, tmp_path, monkeypatch):
    from llamafactory.train.tuner import run_exp

    monkeypatch.setenv("USE_RAY", "1")
    # Refused before LLaMA-Factory starts Ray (ray is not even installed here).
    run_exp(tiny_config(assets, tmp_path / "ray"))


def _zero3_sub_group_size(assets):
    from blockllm_factory.patches.model_checks import check_zero3_sub_group_size

    config = {"zero_optimization": {"stage": 3, "sub_group_size": 1000}}
    check_zero3_sub_group_size(
        SimpleNamespace(model_name_or_path=str(assets.model_dir)), SimpleNamespace(world_size=2), config
    )


def _set_up_tiny_model(family: str, field: str, include_embeddings="auto") -> list[str]:
    """LLaMA-Factory's ``init_adapter`` as patched (its full-tuning path stubbed) on a one-layer ``family`` model built
    by transformers, with ``field`` (``train_from_scratch`` or ``resize_vocab``) true; returns the warnings logged."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from blockllm_factory.patches.adapter import build_init_adapter

    shape = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    shape.update(num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = (
        Gemma3ForCausalLM(Gemma3TextConfig(**shape)) if family == "gemma3" else LlamaForCausalLM(LlamaConfig(**shape))
    )
    warnings = []
    logger = SimpleNamespace(info_rank0=lambda line: None, warning_rank0=warnings.append)
    model_args = SimpleNamespace(compute_dtype=torch.float32, train_from_scratch=False, resize_vocab=False)
    setattr(model_args, field, True)
    finetuning_args = SimpleNamespace(
        finetuning_type="blockllm", use_badam=False, pure_bf16=False, blockllm_include_embeddings=include_embeddings
    )
    build_init_adapter(lambda config, model, *args: model, logger)(None, model, model_args, finetuning_args, True)
    return warnings


def documented_triggers(assets, tmp_path, monkeypatch, parse) -> dict:
    """Case id of docs/bad_inputs.md -> a function that must raise the documented error (see test_reliability.py)."""

    def with_env(name: str, value: str, trigger):
        def run():
            monkeypatch.setenv(name, value)
            return trigger()

        return run

    return {
        "surface_missing": _surface_missing,
        "surface_changed": _surface_changed,
        "accelerate_fsdp": with_env("ACCELERATE_USE_FSDP", "true", parse()),
        "accelerate_deepspeed": lambda: _launch(monkeypatch, {"ACCELERATE_USE_DEEPSPEED": "true"}),
        "use_ray": lambda: _ray(assets, tmp_path, monkeypatch),
        "use_unsloth": parse(use_unsloth=True),
        "use_megatron_bridge": lambda: _launch(monkeypatch, {}, use_megatron_bridge=True),
        "train_from_scratch": parse(train_from_scratch=True, blockllm_include_embeddings=False),
        "train_from_scratch_modules": lambda: _set_up_tiny_model("gemma3", "train_from_scratch"),
        "zero3_sub_group_size_parse": lambda: _zero3_sub_group_size(assets),
    }


# ------------------------------------------------------------------------------------------------ documented warnings
@pytest.fixture(scope="module")
def parse_logged(tiny_llamafactory_assets, tmp_path_factory):
    """``run(**overrides)``: LLaMA-Factory's ``get_train_args`` on the tiny assets; returns the warnings logged."""
    output_dir = tmp_path_factory.mktemp("parse_logged") / "out"

    def run(**overrides) -> list[str]:
        records = []

        class Collect(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.WARNING:
                    records.append(record.getMessage())

        handler = Collect()
        # The parse-time patches log under LLaMA-Factory's own logger (patches/parser.py), the optimizer factory under
        # blockllm_factory's.
        loggers = [logging.getLogger("blockllm_factory"), logging.getLogger("llamafactory")]
        for logger in loggers:
            logger.addHandler(handler)
        try:
            parse_args(tiny_llamafactory_assets, output_dir, **overrides)
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
        return records

    return run


def _assert_documented_warning(case: str, warnings: list[str]) -> None:
    documented = bad_inputs("warning")[case]
    assert any(documented_pattern(f"WARNING: {documented}").fullmatch(f"WARNING: {text}") for text in warnings), (
        f"documented:\n{documented}\nlogged:\n" + "\n".join(warnings)
    )


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP tower of one layer, Llama of one layer) saved as a checkpoint: its files, nothing else."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=16, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2,
        ),
        image_token_index=63,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny_llava")
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


def test_every_documented_warning_is_checked():
    assert set(bad_inputs("warning")) == {
        "resize_vocab",
        "resize_vocab_modules",
        "freeze_vision_tower",
        "freeze_vision_tower_unread",
        "max_steps_one",
        "nothing_trained",
        "save_only_model",
    }


def test_auto_embeddings_on_modules_rows_cannot_serve_are_checked_once_the_model_is_set_up():
    """Before, `train_from_scratch: true` with the default `blockllm_include_embeddings: auto` passed the parse-time
    check on Gemma (it cannot see module types) and trained with the random embeddings frozen, said only by a log
    line. Now the set-up model is checked (patches/model_checks.py check_embedding_modules): refused there (the case
    `train_from_scratch_modules`, raised by the documented-refusals test), warned for `resize_vocab`; a Llama's plain
    modules, and `true`, pass silently."""
    _assert_documented_warning("resize_vocab_modules", _set_up_tiny_model("gemma3", "resize_vocab"))
    for field in ("train_from_scratch", "resize_vocab"):
        assert _set_up_tiny_model("llama", field) == []  # plain modules: `auto` trains them as rows
        assert _set_up_tiny_model("gemma3", field, include_embeddings=True) == []  # as the messages say


def test_a_run_that_cannot_train_or_resume_warns_before_it_starts(parse_logged):
    _assert_documented_warning("max_steps_one", parse_logged(max_steps=1))
    _assert_documented_warning("save_only_model", parse_logged(save_only_model=True))
    assert not any("max_steps" in text or "save_only_model" in text for text in parse_logged(max_steps=2))


@pytest.mark.parametrize(("steps", "warned"), [(0, True), (1, True), (2, False)])
def test_a_run_that_ended_before_the_first_update_says_nothing_was_trained(steps, warned, tmp_path):
    """However the run's length was given: the callback reads the optimizer's own step count at the end."""
    from blockllm_factory.hf.wiring import LossFeed, build_callback

    warnings = []
    logger = SimpleNamespace(warning_rank0=warnings.append, info_rank0=lambda text: None)
    optimizer = SimpleNamespace(selection={"step": steps}, selection_events=[], budget=1, eligible_numel=2)
    callback = build_callback(LossFeed(None, optimizer), optimizer, str(tmp_path), False, [], logger)
    callback.on_train_end(None, SimpleNamespace(is_world_process_zero=True), None)
    if warned:
        _assert_documented_warning("nothing_trained", warnings)
    else:
        assert warnings == []


def test_resize_vocab_without_embeddings_warns_and_with_them_does_not(parse_logged):
    _assert_documented_warning("resize_vocab", parse_logged(resize_vocab=True, blockllm_include_embeddings=False))
    for included in ({"blockllm_include_embeddings": True}, {}):  # true, and `auto` in one process with head blocks
        assert not any("resize_vocab" in text for text in parse_logged(resize_vocab=True, **included))
    # `auto` with whole tensors leaves them out, and the warning says why.
    (warning,) = [text for text in parse_logged(resize_vocab=True, blockllm_block_size=0) if "resize_vocab" in text]
    assert "`blockllm_include_embeddings: auto` (false under DDP, DeepSpeed and with whole tensors)" in warning


def test_unfrozen_vision_tower_names_the_blocks_blockllm_never_selects(parse_logged, tiny_llava):
    warnings = parse_logged(
        model_name_or_path=str(tiny_llava), freeze_vision_tower=False, blockllm_include_embeddings=False
    )
    _assert_documented_warning("freeze_vision_tower", warnings)
    (warning,) = [text for text in warnings if "freeze_vision_tower" in text]
    # The CLIP tower's class, patch and position embeddings: named like embeddings, so never eligible.
    assert "vision_tower.embeddings.patch_embedding.weight" in warning
    assert "vision_tower.embeddings.position_embedding.weight" in warning
    assert "encoder.layers" not in warning  # the tower's layers are eligible and train
    # LLaMA-Factory's default (a frozen tower) and the embeddings made eligible (true, or `auto` in one process with
    # head blocks) say nothing.
    assert not any("freeze_vision_tower" in text for text in parse_logged(model_name_or_path=str(tiny_llava)))
    for included in ({"blockllm_include_embeddings": True}, {}):
        eligible = parse_logged(model_name_or_path=str(tiny_llava), freeze_vision_tower=False, **included)
        assert not any("freeze_vision_tower" in text for text in eligible)


def test_unfrozen_vision_tower_of_unreadable_files_still_warns(tiny_llava, tmp_path):
    from blockllm_factory.patches.model_checks import check_vision_tower

    (tmp_path / "config.json").write_text((tiny_llava / "config.json").read_text())  # config only, no weights
    warnings = []
    logger = SimpleNamespace(warning_rank0=warnings.append)
    finetuning_args = SimpleNamespace(freeze_vision_tower=False, blockllm_include_embeddings=False)
    check_vision_tower(SimpleNamespace(model_name_or_path=str(tmp_path)), finetuning_args, logger)
    _assert_documented_warning("freeze_vision_tower_unread", warnings)


def test_a_text_model_with_an_unfrozen_tower_setting_says_nothing(parse_logged):
    assert not any("freeze_vision_tower" in text for text in parse_logged(freeze_vision_tower=False))


# ------------------------------------------------------------------------------------------------ parse-time checks
def test_zero3_sub_group_size_counts_each_process_share(tiny_llamafactory_assets):
    from blockllm_factory.patches.model_checks import (
        check_zero3_sub_group_size,
        checkpoint_tensors,
        per_process_parameters,
    )

    model_args = SimpleNamespace(model_name_or_path=str(tiny_llamafactory_assets.model_dir))
    tensors = checkpoint_tensors(model_args)
    from safetensors.torch import load_file

    stored = load_file(str(tiny_llamafactory_assets.model_dir / "model.safetensors"))
    assert tensors == {name: tensor.numel() for name, tensor in stored.items()}
    for world_size in (1, 2, 3):
        needed = per_process_parameters(tensors, world_size)
        config = {"zero_optimization": {"stage": 3, "sub_group_size": needed}}
        launch = SimpleNamespace(world_size=world_size)
        check_zero3_sub_group_size(model_args, launch, config)  # exactly enough: accepted
        config["zero_optimization"]["sub_group_size"] = needed - 1
        with pytest.raises(ValueError, match=f"at least {needed:,}"):
            check_zero3_sub_group_size(model_args, launch, config)
    # DeepSpeed's default (1e9) and the recipe's 1e12 hold this model; ZeRO-1/2 have no sub-groups.
    check_zero3_sub_group_size(model_args, SimpleNamespace(world_size=1), {"zero_optimization": {"stage": 3}})
    check_zero3_sub_group_size(
        model_args, SimpleNamespace(world_size=1), {"zero_optimization": {"stage": 2, "sub_group_size": 1}}
    )


def test_requested_finetuning_type_is_read_from_every_argument_form():
    from blockllm_factory.patches.launch import requested_finetuning_type

    assert requested_finetuning_type({"finetuning_type": "blockllm"}) == "blockllm"
    assert requested_finetuning_type(["--finetuning_type", "blockllm", "--stage", "sft"]) == "blockllm"
    assert requested_finetuning_type(["--finetuning_type=blockllm"]) == "blockllm"
    assert requested_finetuning_type(["--stage", "sft"]) is None


def test_ray_is_left_alone_for_other_methods(monkeypatch, tiny_llamafactory_assets, tmp_path):
    from llamafactory.hparams import get_ray_args

    monkeypatch.setenv("USE_RAY", "1")
    config = tiny_config(tiny_llamafactory_assets, tmp_path / "out", finetuning_type="full")
    assert get_ray_args(config).use_ray is True


# ------------------------------------------------------------------------------------------------ through the CLI
def test_fsdp_through_accelerate_launch_is_refused_before_the_model_loads(llamafactory_cli, tmp_path):
    # LLaMA-Factory's documented FSDP launch, on one CPU process: accelerate sets ACCELERATE_USE_FSDP, `fsdp` is empty.
    accelerate_config = tmp_path / "fsdp_config.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_sharding_strategy: FULL_SHARD\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_use_orig_params: true\n"
        "machine_rank: 0\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 1\nrdzv_backend: static\n"
        "same_network: true\nuse_cpu: true\n"
    )
    config = llamafactory_cli.config(tmp_path / "out", max_steps=2)
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    argv = [str(ACCELERATE), "launch", "--config_file", str(accelerate_config), str(CLI), "train", "train.yaml"]
    result = run_logged(argv, tmp_path, timeout=300)
    assert result.returncode != 0
    assert (
        "`ACCELERATE_USE_FSDP=true` (set by `accelerate launch` with an FSDP config) cannot be combined" in result.log
    )
    assert "trainable params" not in result.log  # LLaMA-Factory's line after a model loads


def test_zero3_config_too_small_for_the_model_is_refused_before_it_loads(llamafactory_cli, tmp_path):
    ds_config = json.loads((ROOT / "recipes/deepspeed/ds_z3_blockllm.json").read_text())
    ds_config["zero_optimization"]["sub_group_size"] = 10000  # the tiny model holds about 46,000 parameters
    (tmp_path / "ds_z3.json").write_text(json.dumps(ds_config))
    config = llamafactory_cli.config(tmp_path / "out", deepspeed=str(tmp_path / "ds_z3.json"), max_steps=2)
    result = llamafactory_cli.run("train", config, tmp_path, "z3", timeout=300, FORCE_TORCHRUN="1", NPROC_PER_NODE="1")
    assert result.returncode != 0
    assert "`zero_optimization.sub_group_size: 10000` in the DeepSpeed config is smaller than the" in result.log
    assert "trainable params" not in result.log


def test_ppo_does_not_run_in_this_llamafactory_with_any_method(llamafactory_cli, tmp_path):
    """Why `stage: ppo` stays refused: LLaMA-Factory's own PPO trainer stops with full tuning too (its TRL range).

    If this test fails, LLaMA-Factory's PPO runs again: then BlockLLM's loss feed for PPO's loop can be added."""
    config = llamafactory_cli.config(
        tmp_path / "out",
        stage="ppo",
        finetuning_type="full",
        reward_model=str(llamafactory_cli.assets.model_dir),
        reward_model_type="full",
        max_new_tokens=4,
        max_steps=1,
    )
    result = llamafactory_cli.run("train", config, tmp_path, "ppo_full", timeout=300)
    assert result.returncode != 0
    assert "trl>=0.8.6,<=0.9.6 is required" in result.log, result.log[-3000:]

    config["finetuning_type"] = "blockllm"
    refused = llamafactory_cli.run("train", config, tmp_path, "ppo_blockllm", timeout=300)
    assert refused.returncode != 0
    assert "`stage: ppo` cannot be combined with `finetuning_type: blockllm`" in refused.log
    assert "trainable params" not in refused.log

"""``blockllm`` arguments through LLaMA-Factory's own parser (``get_train_args``), in process: no model is loaded.

Each refused value of docs/bad_inputs.md is checked once, against its documented message, by
``test_refused_input_raises_the_documented_error`` in test_reliability.py; the refusals here check what that does not.
"""

from functools import partial

import pytest
import torch
from helpers import bad_inputs, parse_args
from torch import nn

from blockllm_factory.optim.settings import DEFAULTS, SETTINGS, YAML_SETTINGS

FIELDS = tuple(setting.field for setting in YAML_SETTINGS)
# LLaMA-Factory's default and another allowed value of every YAML setting (a new setting adds its pair here).
DEFAULTS_AND_VALUES = {
    "sparsity": (0.95, 0.9),
    "patience": (100, 7),
    "probe": ("sample", "exact"),
    "probe_blocks": (2, 0),
    "include_embeddings": ("auto", True),
    "score": ("norm_per_sqrt_size", "norm"),
    "block_size": ("head", 0),
    "norms": ("select", "always"),
    "coverage": ("auto", 4.0),
    "reselect_warmup": (0, 5),
    "reselect_until": (0, 90),
    "master": ("fp32", "compensated"),
    "keep": ("fraction", "threshold"),
}


@pytest.fixture(scope="module")
def parse(tiny_llamafactory_assets, tmp_path_factory):
    """``parse(**overrides)``: :func:`helpers.parse_args` on the tiny assets."""
    return partial(parse_args, tiny_llamafactory_assets, tmp_path_factory.mktemp("parse") / "out")


def test_defaults_and_values_reach_finetuning_args(parse):
    finetuning_args = parse()[3]
    assert finetuning_args.finetuning_type == "blockllm"
    assert tuple(DEFAULTS_AND_VALUES) == tuple(setting.name for setting in YAML_SETTINGS)
    defaults = tuple(default for default, _ in DEFAULTS_AND_VALUES.values())
    assert tuple(getattr(finetuning_args, field) for field in FIELDS) == defaults

    values = tuple(value for _, value in DEFAULTS_AND_VALUES.values())
    finetuning_args = parse(**dict(zip(FIELDS, values)))[3]
    assert tuple(getattr(finetuning_args, field) for field in FIELDS) == values


def test_command_line_form_and_help_text(tiny_llamafactory_assets, tmp_path):
    from llamafactory.hparams import FinetuningArguments, get_train_args
    from transformers import HfArgumentParser

    help_text = " ".join(HfArgumentParser(FinetuningArguments).format_help().split())  # undo argparse's wrapping
    assert "--blockllm_sparsity" in help_text and "updates about one coordinate in twenty" in help_text
    assert "{lora,oft,freeze,full,blockllm}" in help_text
    assert "--blockllm_probe {sample,exact}" in help_text

    argv = [
        "--model_name_or_path", str(tiny_llamafactory_assets.model_dir),
        "--dataset_dir", str(tiny_llamafactory_assets.dataset_dir),
        "--dataset", "tiny_sft", "--template", "default", "--do_train", "true", "--use_cpu", "true",
        "--output_dir", str(tmp_path / "out"), "--report_to", "none",
        "--finetuning_type", "blockllm", "--blockllm_probe", "exact", "--blockllm_include_embeddings", "true",
        "--blockllm_block_size", "8192", "--blockllm_patience", "0.25", "--blockllm_norms", "frozen",
    ]  # fmt: skip
    finetuning_args = get_train_args(argv)[3]
    assert finetuning_args.finetuning_type == "blockllm"
    assert finetuning_args.blockllm_probe == "exact" and finetuning_args.blockllm_include_embeddings is True
    assert finetuning_args.blockllm_block_size == 8192  # a number on the command line is a number
    assert finetuning_args.blockllm_patience == 0.25 and finetuning_args.blockllm_norms == "frozen"
    assert "--blockllm_norms {select,always,frozen}" in help_text


# What the docs table's test does not feed: the other values its entries list under "Also" (the ends of a range, a
# fraction, a string close to an allowed one), and a message that must name several arguments at once.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"blockllm_sparsity": 1.0}, r"`blockllm_sparsity` must be a number in \[0, 1\)"),
        ({"blockllm_sparsity": -0.1}, r"`blockllm_sparsity` must be a number in \[0, 1\)"),
        (
            {"blockllm_patience": 2.5},
            r"`blockllm_patience` must be a number in \(0, 1\) .* or an integer from 1 to 1,000,000,000",
        ),
        ({"blockllm_patience": 1.0}, r"`blockllm_patience` must be .* got 1.0"),
        ({"blockllm_patience": "0.5x"}, r"`blockllm_patience` must be .* got '0.5x'"),
        ({"blockllm_block_size": "heads"}, r"`blockllm_block_size` must be `head` .* got 'heads'"),
        ({"blockllm_block_size": 0.5}, r"`blockllm_block_size` must be `head` .* got 0.5"),
        ({"blockllm_coverage": "fourx"}, r"`blockllm_coverage` must be `auto` .* got 'fourx'"),
        ({"blockllm_coverage": float("inf")}, r"`blockllm_coverage` must be `auto` .* got inf"),
        ({"learning_rate": float("nan")}, r"`learning_rate` must be a number >= 0, got nan"),
        ({"lora_target": "q_proj", "use_dora": True}, r"lora_target='q_proj', use_dora=True"),
    ],
)
def test_bad_arguments_are_refused_by_name(parse, overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(**overrides)


# One bad value (at least) per ``blockllm_*`` field: the Python API and the YAML path refuse it with one message
# (settings.py), naming `sparsity` or `blockllm_sparsity`; a YAML block size also offers `head`, a YAML patience a
# share of the run, which only YAML accepts.
BAD_VALUES = [
    ("sparsity", 1.5),
    ("sparsity", True),
    ("patience", 0),
    ("patience", 2.5),
    ("probe", "all"),
    ("probe_blocks", -1),
    ("include_embeddings", "maybe"),
    ("score", "size"),
    ("block_size", -1),
    ("coverage", 0.5),
    ("reselect_warmup", -1),
    ("reselect_until", -1),
    ("block_size", 0.5),
    ("norms", "train"),
    ("master", "fp16"),
    ("keep", "top"),
]


def test_every_yaml_setting_has_a_bad_value_here_and_a_refusal_in_bad_inputs():
    assert {name for name, _ in BAD_VALUES} == {setting.name for setting in YAML_SETTINGS}
    documented = bad_inputs("case")  # docs/bad_inputs.md's cases (test_reliability.py triggers each)
    assert [setting.field for setting in YAML_SETTINGS if setting.field not in documented] == []


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_python_api_and_yaml_refuse_a_bad_value_with_one_message(parse, name, value):
    from blockllm_factory.optim import BlockLLM

    with pytest.raises(ValueError) as from_python:
        BlockLLM(nn.Linear(4, 4).named_parameters(), **{name: value})
    with pytest.raises(ValueError) as from_yaml:
        parse(**{f"blockllm_{name}": value})
    python_message = str(from_python.value)
    setting = SETTINGS[name]
    assert python_message == f"`{name}` must be {setting.allowed}, got {value!r}."
    assert str(from_yaml.value) == f"`blockllm_{name}` must be {setting.allowed_in(yaml=True)}, got {value!r}."
    # The YAML field's message lists what only YAML takes, then the Python API's allowed values as they are.
    assert setting.allowed_in(yaml=True).endswith(setting.allowed)
    assert all(accepted in setting.allowed_in(yaml=True) for accepted in setting.yaml_only())


def test_every_blockllm_field_comes_from_the_settings():
    import dataclasses

    from blockllm_factory.patches.arguments import BlockLLMArguments

    fields = {spec.name: spec for spec in dataclasses.fields(BlockLLMArguments)}
    assert tuple(fields) == FIELDS == tuple(setting.field for setting in YAML_SETTINGS)
    for setting in YAML_SETTINGS:
        assert fields[setting.field].default == setting.yaml_default
        assert fields[setting.field].metadata["help"] == setting.help


def test_blockllm_takes_exactly_the_settings_of_the_table_with_their_defaults():
    import inspect

    from blockllm_factory.optim import BlockLLM

    parameters = dict(inspect.signature(BlockLLM).parameters)
    assert parameters.pop("params").default is inspect.Parameter.empty
    assert {name: parameter.default for name, parameter in parameters.items()} == DEFAULTS


def test_the_builder_passes_every_setting_of_the_table(parse, monkeypatch):
    """hf/optimizer.py hands BlockLLM every setting: the YAML ones by name, the others from the training arguments
    (``set_from``), ``seed`` included."""
    from types import SimpleNamespace

    from blockllm_factory.hf import optimizer as builder
    from blockllm_factory.optim import BlockLLM

    passed = {}

    def recording_class(training_args):
        def build(params, **settings):
            passed.update(settings)
            return BlockLLM(params, **settings)

        return build

    monkeypatch.setattr(builder, "blockllm_optimizer_class", recording_class)
    _, _, training_args, finetuning_args, *_ = parse(seed=1234, blockllm_norms="always")
    logger = SimpleNamespace(info_rank0=lambda text: None, warning_rank0=lambda text: None)
    builder.build_optimizer(nn.Linear(8, 8), training_args, finetuning_args, {"weight"}, logger)
    assert set(passed) == set(SETTINGS)
    assert passed["seed"] == 1234 and passed["norms"] == "always" and passed["lr"] == training_args.learning_rate


@pytest.mark.parametrize("probe", ["sample", "exact"])
def test_the_log_line_says_when_the_last_reselection_can_happen(parse, probe):
    """``blockllm_reselect_until: N`` stops the loss rule after step N; the exact probe acts on a rule fired at step N
    one step later (its measuring step), and the log line says so rather than "until step N" alone."""
    from types import SimpleNamespace

    from blockllm_factory.hf import optimizer as builder

    lines = []
    _, _, training_args, finetuning_args, *_ = parse(blockllm_reselect_until=13, blockllm_probe=probe)
    logger = SimpleNamespace(info_rank0=lines.append, warning_rank0=lines.append)
    builder.build_optimizer(nn.Linear(8, 8), training_args, finetuning_args, {"weight"}, logger)
    (line,) = [line for line in lines if line.startswith("Using BlockLLM optimizer")]
    if probe == "exact":
        assert "reselections until step 13 (the exact probe's: a rule fired at step 13 reselects at 14), " in line
    else:
        assert "reselections until step 13, warm-up" in line


def test_lora_defaults_written_out_explicitly_are_accepted(parse):
    # e.g. a YAML copied from a LoRA recipe that only restates the defaults
    assert parse(lora_rank=8, lora_target="all", lora_dropout=0.0)[3].finetuning_type == "blockllm"


def test_other_methods_parse_as_before(parse):
    assert parse(finetuning_type="lora", lora_rank=16)[3].lora_rank == 16
    assert parse(finetuning_type="full", use_galore=True)[3].use_galore is True
    # Out-of-range blockllm values are errors whatever the method: they can only be a mistake.
    with pytest.raises(ValueError, match="blockllm_sparsity"):
        parse(finetuning_type="full", blockllm_sparsity=2.0)


def test_reward_model_stage_does_not_resume_like_full_tuning(parse, tmp_path):
    # The value-head checkpoint layout does not load back into the model: resuming would keep initial weights.
    for name in ("optimizer.pt", "scheduler.pt"):  # what BlockLLM needs to resume from the folder (checkpoints.py)
        torch.save({}, tmp_path / name)
    training_args = parse(stage="rm", dataset="tiny_pairwise", resume_from_checkpoint=str(tmp_path))[2]
    assert training_args.resume_from_checkpoint is None
    assert parse(resume_from_checkpoint=str(tmp_path))[2].resume_from_checkpoint == str(tmp_path)


def test_head_block_size_comes_from_the_models_config():
    from types import SimpleNamespace as NS

    from blockllm_factory.hf.optimizer import head_block_size, resolve_block_size

    class Logger:
        def __init__(self):
            self.lines = []

        def info_rank0(self, text):
            self.lines.append(text)

        warning_rank0 = info_rank0

    llama = NS(config=NS(hidden_size=4096, num_attention_heads=32))
    assert head_block_size(llama) == 128 * 4096  # Llama-2-7B: one head of q/k/v
    assert head_block_size(NS(config=NS(hidden_size=2048, num_attention_heads=16, head_dim=256))) == 256 * 2048
    vision_language = NS(config=NS(text_config=NS(hidden_size=256, num_attention_heads=8), vision_config=NS()))
    assert head_block_size(vision_language) == 32 * 256
    reward_model = NS(pretrained_model=NS(config=NS(hidden_size=256, num_attention_heads=8)))  # trl's value head
    assert head_block_size(reward_model) == 32 * 256

    logger = Logger()
    assert resolve_block_size("head", llama, False, logger) == 128 * 4096 and not logger.lines
    assert resolve_block_size(64, llama, False, logger) == 64 and resolve_block_size(0, llama, False, logger) == 0
    assert resolve_block_size("head", llama, True, logger) == 0  # DeepSpeed's adapter selects whole tensors
    assert "whole tensors" in logger.lines[-1]
    assert resolve_block_size("head", NS(config=NS()), False, logger) == 0  # no heads in the config: said
    assert "has no hidden_size" in logger.lines[-1]


@pytest.mark.parametrize(
    ("overrides", "coverage"),
    [
        ({}, 4.0),  # auto with head blocks (the stand-in config: 256 coordinates)
        ({"blockllm_block_size": 0}, 1.0),  # auto with whole tensors: the paper's
        ({"blockllm_block_size": 64}, 4.0),  # auto with any row groups
        ({"blockllm_coverage": 2.5}, 2.5),  # a number stays
        ({"blockllm_coverage": "1.5"}, 1.5),  # as typed on the command line or in the web UI
    ],
)
def test_coverage_auto_is_four_with_row_groups_and_one_with_whole_tensors(parse, overrides, coverage):
    """What the builder hands BlockLLM for ``blockllm_coverage``, and what its log line says."""
    from types import SimpleNamespace

    from blockllm_factory.hf import optimizer as builder

    lines = []
    logger = SimpleNamespace(info_rank0=lines.append, warning_rank0=lines.append)
    _, model_args, training_args, finetuning_args, *_ = parse(**overrides)
    model = nn.Linear(8, 8)
    model.config = SimpleNamespace(hidden_size=32, num_attention_heads=4)
    optimizer = builder.build_optimizer(model, training_args, finetuning_args, {"weight"}, logger)
    assert optimizer.coverage == coverage
    (line,) = [line for line in lines if line.startswith("Using BlockLLM optimizer")]
    auto = " (`blockllm_coverage: auto`)" if "blockllm_coverage" not in overrides else ""
    assert f"coverage {coverage:g}{auto}, " in line


def test_coverage_auto_under_deepspeed_is_one():
    """DeepSpeed's adapter selects whole tensors (``head`` -> 0), so ``auto`` resolves to the paper's 1 there."""
    from blockllm_factory.hf.optimizer import resolve_coverage

    assert resolve_coverage("auto", 0) == 1.0 and resolve_coverage("auto", 128 * 4096) == 4.0
    assert resolve_coverage(2.0, 0) == 2.0

"""The Trainer front (blockllm_factory.hf): BlockLLM in the real transformers ``Trainer`` and TRL's ``SFTTrainer``.

In-process runs on the tiny Llama and tokenizer of the ``tiny_llamafactory_assets`` fixture (no LLaMA-Factory): only
the selection changes at each optimizer step, the loss reaches the optimizer once per optimizer step (so the loss rule
reselects), a run resumed from the Trainer's checkpoint ends bit for bit where an uninterrupted one does, and a bad
setting is refused with the YAML's message (docs/bad_inputs.md).
"""

import json

import pytest
import torch
from helpers import bad_inputs, documented_pattern

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _texts(assets) -> list[str]:
    records = json.loads((assets.dataset_dir / "tiny_sft.json").read_text(encoding="utf-8"))
    return [f"{record['instruction']} = {record['output']}" for record in records]


def _model_and_tokenizer(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(assets.model_dir), AutoTokenizer.from_pretrained(assets.model_dir)


class _Witness:
    """A TrainerCallback (built lazily: transformers is imported by the test) that, at every optimizer step, records
    which parameters changed and how many coordinates, against the selection that governed that step."""

    def __new__(cls, optimizer_of):
        from transformers import TrainerCallback

        class Witness(TrainerCallback):
            def __init__(self):
                self.steps = []  # (changed {param: coordinates}, selected params, budget)
                self.before = None

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if self.before is None:  # gradient accumulation: once per optimizer step
                    self.before = {name: param.detach().clone() for name, param in model.named_parameters()}

            def on_step_end(self, args, state, control, model=None, **kwargs):
                optimizer = optimizer_of()
                changed = {
                    name: int((param.detach() != self.before[name]).sum())
                    for name, param in model.named_parameters()
                    if not torch.equal(param.detach(), self.before[name])
                }
                self.steps.append((changed, self.selected, optimizer.budget))
                self.before = None
                self.selected = {optimizer.blocks[block].param for block in optimizer.kept_coordinates}

        witness = Witness()
        witness.selected = set()  # the first optimizer step measures every block and makes the first selection
        return witness


def _feed_spy(monkeypatch):
    from blockllm_factory.optim import BlockLLM

    fed = []
    original = BlockLLM.record_loss

    def record_loss(self, value):
        fed.append(float(value))
        return original(self, value)

    monkeypatch.setattr(BlockLLM, "record_loss", record_loss)
    return fed


def _training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-2,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 1.0,
        "max_steps": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 3,
        "data_seed": 3,
        "disable_tqdm": True,
        **overrides,
    }
    return TrainingArguments(**settings)


def _lm_dataset(assets, tokenizer):
    from datasets import Dataset

    encoded = tokenizer(_texts(assets), truncation=True, max_length=48)
    return Dataset.from_dict({"input_ids": encoded["input_ids"]})


RESELECTING = {"blockllm_sparsity": 0.8, "blockllm_patience": 1}


def _check_run(witness, fed, optimizer, max_steps):
    assert len(fed) == max_steps  # one loss per optimizer step, the accumulated micro-steps' mean
    assert all(value > 0 for value in fed)
    assert optimizer.selection["reselections"] >= 1, "the loss feed never made the loss rule fire"
    assert len(witness.steps) == max_steps
    updated = 0
    for changed, selected, budget in witness.steps:
        assert set(changed) <= selected, f"parameters outside the selection changed: {set(changed) - selected}"
        assert sum(changed.values()) <= budget
        updated += bool(changed)
    assert updated >= max_steps - 1  # every step after the first (which measures and selects) trained something


@pytest.mark.parametrize("include_embeddings", [False, "auto"], ids=["frozen_embeddings", "default"])
def test_trainer_trains_only_the_selection_and_feeds_the_loss_every_step(
    tiny_llamafactory_assets, tmp_path, monkeypatch, include_embeddings
):
    """The real Trainer with gradient accumulation, clipping by the selection's norm, gradient checkpointing (frozen
    embeddings make the layers' inputs need no grad; by default they are row blocks) and compact gradients."""
    from transformers import DataCollatorForLanguageModeling

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMTrainer

    fed = _feed_spy(monkeypatch)
    model, tokenizer = _model_and_tokenizer(tiny_llamafactory_assets)
    trainer = BlockLLMTrainer(
        model=model,
        args=_training_args(tmp_path / "out", gradient_checkpointing=True),
        train_dataset=_lm_dataset(tiny_llamafactory_assets, tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        blockllm_config=BlockLLMConfig(**RESELECTING, blockllm_include_embeddings=include_embeddings),
    )
    witness = _Witness(lambda: trainer.blockllm_optimizer)
    trainer.add_callback(witness)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    trainer.train()

    optimizer = trainer.blockllm_optimizer
    assert optimizer.compact_gradients and optimizer.block_size == 8 * 32  # `head`: head_dim x hidden
    _check_run(witness, fed, optimizer, max_steps=8)
    trained = model.get_input_embeddings().weight
    if include_embeddings is False:
        assert optimizer.row_gradient_names == []
        assert torch.equal(trained, embeddings)  # not eligible without include_embeddings
    else:  # `auto`, the default, in one process with head blocks: row blocks, their gradients kept as rows
        assert optimizer.include_embeddings and "model.embed_tokens.weight" in optimizer.row_gradient_names
        changed = int((trained != embeddings).any(dim=1).sum())
        assert 0 < changed < embeddings.shape[0]
    # The Trainer logged the selection's norm (the first step only measures and selects), and the selection log has
    # every (re)selection.
    norms = [float(entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == 8 and norms[0] == 0 and all(norm > 0 for norm in norms[1:])
    log = (tmp_path / "out" / "blockllm_selection.jsonl").read_text().splitlines()
    assert len(log) == len(optimizer.selection_events) == optimizer.selection["reselections"] + 1


def test_sft_trainer_trains_only_the_selection_and_feeds_the_loss(tiny_llamafactory_assets, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMSFTTrainer

    fed = _feed_spy(monkeypatch)
    model, tokenizer = _model_and_tokenizer(tiny_llamafactory_assets)
    records = json.loads((tiny_llamafactory_assets.dataset_dir / "tiny_sft.json").read_text(encoding="utf-8"))
    pairs = [{"prompt": record["instruction"] + " =", "completion": " " + record["output"]} for record in records]
    dataset = Dataset.from_list(pairs)
    arguments = _training_args(tmp_path / "out", max_steps=6).to_dict()
    arguments.update(max_length=48, dataset_num_proc=None, optim="adamw_bnb_8bit")
    trainer = BlockLLMSFTTrainer(
        model=model,
        args=SFTConfig(**arguments),
        train_dataset=dataset,
        processing_class=tokenizer,
        blockllm_config=BlockLLMConfig(**RESELECTING, blockllm_block_size=0),
    )
    witness = _Witness(lambda: trainer.blockllm_optimizer)
    trainer.add_callback(witness)
    trainer.train()
    optimizer = trainer.blockllm_optimizer
    assert optimizer.optim_bits == 8 and optimizer.block_size == 0
    _check_run(witness, fed, optimizer, max_steps=6)


def _resumable_run(assets, output_dir, resume_from=None, include_embeddings=False):
    from transformers import DataCollatorForLanguageModeling

    from blockllm_factory.hf import BlockLLMConfig, BlockLLMTrainer

    model, tokenizer = _model_and_tokenizer(assets)
    trainer = BlockLLMTrainer(
        model=model,
        args=_training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=_lm_dataset(assets, tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        # Frozen embeddings: the loss then stalls within 6 steps and the run reselects before and after the checkpoint
        # (a resume with the embeddings as row blocks: tests/test_integration.py, the resumed 8-bit run).
        blockllm_config=BlockLLMConfig(**RESELECTING, blockllm_include_embeddings=include_embeddings),
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return {name: param.detach().clone() for name, param in model.named_parameters()}, trainer.blockllm_optimizer


def test_resume_from_the_trainers_checkpoint_is_bit_exact(tiny_llamafactory_assets, tmp_path):
    whole, whole_optimizer = _resumable_run(tiny_llamafactory_assets, tmp_path / "whole")
    assert whole_optimizer.selection["reselections"] >= 1
    resumed, resumed_optimizer = _resumable_run(
        tiny_llamafactory_assets, tmp_path / "resumed", resume_from=str(tmp_path / "whole" / "checkpoint-3")
    )
    assert resumed_optimizer.selection_events == whole_optimizer.selection_events
    assert all(torch.equal(resumed[name], whole[name]) for name in whole), "the resumed run's weights differ"
    # `blockllm_include_embeddings: auto` (BlockLLMConfig's default, true here) takes the checkpoint's value, false:
    # before, the optimizer's load refused the checkpoint (`state_dict_embeddings`). A value set by hand is kept.
    from blockllm_factory.hf import trainer as trainer_module

    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.logger, "info_rank0", lines.append)
        adopted, adopted_optimizer = _resumable_run(
            tiny_llamafactory_assets,
            tmp_path / "adopted",
            resume_from=str(tmp_path / "whole" / "checkpoint-3"),
            include_embeddings="auto",
        )
    assert not adopted_optimizer.include_embeddings
    assert adopted_optimizer.selection_events == whole_optimizer.selection_events
    assert all(torch.equal(adopted[name], whole[name]) for name in whole)
    assert (
        f"`blockllm_include_embeddings: auto` resumes {tmp_path / 'whole' / 'checkpoint-3'} with the checkpoint's "
        "`blockllm_include_embeddings: False`." in lines
    )
    with pytest.raises(ValueError, match="set include_embeddings=False"):
        _resumable_run(
            tiny_llamafactory_assets,
            tmp_path / "by_hand",
            resume_from=str(tmp_path / "whole" / "checkpoint-3"),
            include_embeddings=True,
        )


def test_ddp_arguments_let_the_trainer_load_its_optimizer_state_on_cpu(monkeypatch):
    """With more than one process the Trainer loads optimizer.pt with ``map_location=args.device``, on CPU ``cpu:0``,
    which torch refuses ("don't know how to restore data location ... (tagged with cpu:0)"): before, a DDP run of the
    Trainer front on CPU could not resume. The DDP check both fronts run lets it (found by a two-process hand run,
    docs/hf.md; the suite runs one process)."""
    import io
    from types import SimpleNamespace

    import torch.serialization

    from blockllm_factory.hf import serialization
    from blockllm_factory.hf.engine import check_ddp

    # Start from torch's own registry, whatever earlier tests registered in this process.
    monkeypatch.setattr(serialization, "_registered", False)
    ours = serialization._restore_on_indexed_cpu
    registry = [entry for entry in torch.serialization._package_registry if entry[2] is not ours]
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    saved = io.BytesIO()
    torch.save({"moment": torch.arange(4.0)}, saved)

    def load():
        return torch.load(io.BytesIO(saved.getvalue()), map_location=torch.device("cpu", 0), weights_only=True)

    with pytest.raises(RuntimeError, match="cpu:0"):
        load()
    ddp = SimpleNamespace(
        fsdp="", deepspeed=None, world_size=2, ddp_find_unused_parameters=None, ddp_static_graph=False
    )
    check_ddp(ddp)
    assert ddp.ddp_find_unused_parameters is True
    assert torch.equal(load()["moment"], torch.arange(4.0))


@pytest.mark.parametrize(("stage", "reentrant"), [(2, True), (3, False)])
def test_the_trainer_front_checkpoints_non_reentrantly_under_zero3(tmp_path, stage, reentrant):
    """As the LLaMA-Factory front does (docs/distributed.md, "ZeRO-3 and gradient checkpointing"): under ZeRO-3 a
    reentrant checkpoint would keep every gathered frozen weight to the end of the backward pass; ZeRO-1/2 keep the
    user's choice."""
    from types import SimpleNamespace

    from blockllm_factory.hf import BlockLLMConfig
    from blockllm_factory.hf.trainer import check_training_arguments

    config = {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    arguments = _training_args(tmp_path).to_dict()
    arguments.update(
        optim="adamw_torch",
        deepspeed=config,
        hf_deepspeed_config=SimpleNamespace(config=config),
        fsdp="",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    args = SimpleNamespace(**arguments)
    check_training_arguments(args, BlockLLMConfig())
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": reentrant}


@pytest.mark.parametrize(
    ("case", "settings"),
    [("blockllm_sparsity", {"blockllm_sparsity": 1.5}), ("blockllm_patience", {"blockllm_patience": 0})],
)
def test_a_bad_setting_is_refused_with_the_yaml_message(case, settings):
    from blockllm_factory.hf import BlockLLMConfig

    documented = bad_inputs("case")[case]
    with pytest.raises(ValueError) as error:
        BlockLLMConfig(**settings)
    assert documented_pattern(documented).fullmatch(f"ValueError: {error.value}")


@pytest.mark.parametrize(("case", "value"), [("learning_rate", -1.0), ("adam_beta1", 1.0)])
def test_a_bad_training_argument_is_refused_with_the_yaml_message(case, value, tiny_llamafactory_assets, tmp_path):
    """The AdamW values come from the TrainingArguments: refused when the trainer is created, naming the argument as
    the YAML path does at parse time (before, only BlockLLM's constructor refused them, at train(), naming `lr`)."""
    from blockllm_factory.hf import BlockLLMTrainer

    model, _ = _model_and_tokenizer(tiny_llamafactory_assets)
    with pytest.raises(ValueError) as error:
        BlockLLMTrainer(model=model, args=_training_args(tmp_path / "out", **{case: value}))
    assert documented_pattern(bad_inputs("case")[case]).fullmatch(f"ValueError: {error.value}")


def documented_triggers(assets) -> dict:
    """Case id of docs/bad_inputs.md -> a function that must raise the documented error (see test_reliability.py)."""
    from types import SimpleNamespace

    def trainer(**options):
        def create():
            from blockllm_factory.hf import BlockLLMTrainer

            model, _ = _model_and_tokenizer(assets)
            arguments = {key: options.pop(key) for key in list(options) if key == "optim"}
            return BlockLLMTrainer(
                model=model, args=_training_args(assets.model_dir.parent / "hf", **arguments), **options
            )

        return create

    def deepspeed():
        from blockllm_factory.hf import BlockLLMConfig
        from blockllm_factory.hf.trainer import check_training_arguments

        config = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}
        arguments = _training_args(assets.model_dir.parent / "hf").to_dict()  # the values a real run checks first
        arguments.update(optim="adamw_torch", deepspeed=config, fsdp="")
        check_training_arguments(SimpleNamespace(**arguments), BlockLLMConfig())

    def resume_without_optimizer_state():
        from transformers import DataCollatorForLanguageModeling

        from blockllm_factory.hf import BlockLLMTrainer

        def run(max_steps, **options):
            model, tokenizer = _model_and_tokenizer(assets)
            output_dir = assets.model_dir.parent / "hf_weights_only"
            return BlockLLMTrainer(
                model=model,
                args=_training_args(
                    output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, save_only_model=True
                ),
                train_dataset=_lm_dataset(assets, tokenizer),
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            ).train(**options)

        run(2)  # checkpoint-2: weights and trainer state, no optimizer.pt or scheduler.pt
        run(4, resume_from_checkpoint=str(assets.model_dir.parent / "hf_weights_only" / "checkpoint-2"))

    return {
        "hf_resume_without_optimizer_state": resume_without_optimizer_state,
        "hf_optim": trainer(optim="sgd"),
        "hf_optimizers": trainer(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1})),
        "hf_deepspeed_optimizer": deepspeed,
        "hf_config_type": trainer(blockllm_config={"blockllm_sparsity": 0.9}),
    }


# ------------------------------------------------------------------------------------------------ GLUE
A5_LEARNING_RATES = {  # the paper's appendix A.5, BlockLLM's tuned rate per task
    "mrpc": 3e-5,
    "cola": 5e-5,
    "stsb": 3e-5,
    "rte": 3e-5,
    "sst2": 3e-5,
    "mnli": 3e-5,
    "qnli": 1e-5,
    "qqp": 3e-5,
}


def test_every_glue_recipe_parses_with_the_papers_learning_rate():
    from pathlib import Path

    from blockllm_factory.glue.recipe import load_recipe

    recipes = sorted(Path(__file__).resolve().parent.parent.glob("recipes/glue/*.yaml"))
    assert {path.stem for path in recipes} == set(A5_LEARNING_RATES)
    for path in recipes:
        recipe = load_recipe(str(path))
        assert recipe.task.name == path.stem and recipe.model == "FacebookAI/roberta-base"
        assert recipe.dataset == "nyu-mll/glue" and recipe.methods == ["blockllm", "galore", "full"]
        assert recipe.arguments("blockllm")["learning_rate"] == A5_LEARNING_RATES[path.stem]
        assert recipe.arguments("galore")["optim"] == "galore_adamw"
        assert recipe.arguments("blockllm")["per_device_train_batch_size"] == (32 if path.stem == "cola" else 16)


def test_glue_metrics():
    import numpy as np

    from blockllm_factory.glue.recipe import TASKS
    from blockllm_factory.glue.runner import task_metrics

    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    cola = task_metrics(TASKS["cola"], logits, np.array([1, 0, 0, 0]))
    assert cola["accuracy"] == 0.75 and abs(cola["matthews_correlation"] - 1 / 3**0.5) < 1e-9
    assert task_metrics(TASKS["mrpc"], logits, np.array([1, 0, 0, 0]))["f1"] == 2 / 3
    stsb = task_metrics(TASKS["stsb"], np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 3.0, 2.0]))
    assert stsb["pearson"] == pytest.approx(0.5) and stsb["spearman"] == pytest.approx(0.5)


def _tiny_roberta(assets, folder):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.pad_token_id + 1 + 32 + 2,  # RoBERTa's positions start after the pad id
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
    )
    RobertaForSequenceClassification(config).save_pretrained(folder)


def _write_pairs(path, texts, seed):
    """An MRPC-like CSV: label 1 where sentence2 is sentence1 reworded (same words, reversed), else another one."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["sentence1", "sentence2", "label", "idx"])
        for index, text in enumerate(texts):
            same = rng.random() < 0.5
            other = " ".join(reversed(text.split())) if same else rng.choice(texts)
            writer.writerow([text, other, int(same), index])


def test_glue_command_runs_blockllm_galore_and_full_offline(tiny_llamafactory_assets, tmp_path, capsys):
    from blockllm_factory.cli import main

    _tiny_roberta(tiny_llamafactory_assets, tmp_path / "roberta")
    texts = [text.split(" = ")[0] for text in _texts(tiny_llamafactory_assets)]
    _write_pairs(tmp_path / "train.csv", texts[:48], seed=1)
    _write_pairs(tmp_path / "dev.csv", texts[48:], seed=2)
    settings = {
        "model": tmp_path / "roberta",
        "train_file": tmp_path / "train.csv",
        "validation_file": tmp_path / "dev.csv",
        "max_length": 32,
        "training.max_steps": 4,
        "training.per_device_train_batch_size": 8,
        "training.eval_strategy": '"no"',  # quoted: YAML reads a bare no as false
        "training.use_cpu": True,
        "blockllm.blockllm_patience": 1,
    }
    overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    assert main(["glue", "recipes/glue/mrpc.yaml", "--out", str(tmp_path / "report"), *overrides]) == 0

    report = json.loads((tmp_path / "report" / "glue_mrpc.json").read_text())
    results = {result["method"]: result for result in report["results"]}
    assert list(results) == ["blockllm", "galore", "full"]
    for result in results.values():
        assert result["steps"] == 4 and 0 <= result["final"]["accuracy"] <= 1 and 0 <= result["final"]["f1"] <= 1
        assert result["memory"]["peak_tracked_bytes"] > result["memory"]["parameter_bytes"] > 0
    # Measured, not computed: BlockLLM holds Adam moments for its selection only, full fine-tuning for every weight.
    memory = {method: result["memory"] for method, result in results.items()}
    assert 0 < memory["blockllm"]["optimizer_state_bytes"] < memory["full"]["optimizer_state_bytes"] / 4
    assert results["galore"]["optim"] == "galore_adamw" and results["blockllm"]["learning_rate"] == 3e-5
    table = (tmp_path / "report" / "glue_mrpc.md").read_text()
    assert table.count("\n| blockllm |") == table.count("\n| galore |") == table.count("\n| full |") == 1
    assert "| blockllm |" in capsys.readouterr().out


def test_glue_command_refuses_a_bad_recipe_naming_the_key(tmp_path, capsys):
    from blockllm_factory.cli import main

    recipe = tmp_path / "wnli.yaml"
    recipe.write_text("task: wnli\n", encoding="utf-8")
    assert main(["glue", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "`task` must be one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, got 'wnli'" in capsys.readouterr().err
    assert main(["glue", "recipes/glue/mrpc.yaml", "--set", "train_file=x.csv", "--out", str(tmp_path / "out")]) == 2
    assert "give both `train_file` and `validation_file`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""``blockllm-factory bench``: suite validation, the measurement callback, the goals, and the harness end to end.

The end-to-end test runs the installed console script on a tiny suite (full fine-tuning, a method that cannot start
training, BlockLLM) through the real ``llamafactory-cli train`` path, then runs the same command again.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from blockllm_factory.bench import report
from blockllm_factory.bench.suite import SuiteError, load_suite
from blockllm_factory.patches import metrics

BENCH = Path(sys.executable).with_name("blockllm-factory")
RUN_FIELDS = (
    "name",
    "status",
    "error",
    "peak_memory_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "master_weight_bytes",
    "trainable_parameters",
    "step_time_s",
    "tokens_per_s",
    "final_train_loss",
    "eval_loss",
    "loss_curve",
)
SPARSITY = 0.95


def _write_suite(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


def _minimal(**base) -> dict:
    return {
        "base": {"model_name_or_path": "m", "stage": "sft", "dataset": "d", **base},
        "methods": {"full": {"finetuning_type": "full"}},
    }


# ---------------------------------------------------------------- suite validation


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.update(methodz={}), "methodz"),
        (lambda s: s["methods"]["full"].update(seed=3), "methods.full.seed"),
        (lambda s: s["methods"]["full"].update(max_steps=3), "methods.full.max_steps"),
        (lambda s: s["base"].update(output_dir="x"), "base.output_dir"),
        (lambda s: s["base"].update(learning_rat=1e-3), "'learning_rat' (did you mean 'learning_rate'"),
        (lambda s: s["base"].pop("model_name_or_path"), "'model_name_or_path'"),
        (lambda s: s.pop("methods"), "'methods'"),
        (lambda s: s["methods"].update({"bad name": {}}), "methods.bad name"),
        (lambda s: s.update(env={"X": [1]}), "env.X"),
    ],
)
def test_a_bad_suite_is_refused_naming_the_key(tmp_path, change, named):
    suite = _minimal()
    change(suite)
    with pytest.raises(SuiteError) as error:
        load_suite(_write_suite(tmp_path / "suite.yaml", suite))
    assert named in str(error.value)


def test_an_unknown_method_argument_fails_that_run_only(tmp_path):
    suite = _minimal()
    suite["methods"]["typo"] = {"finetuning_type": "lora", "lora_rnak": 8}
    loaded = load_suite(_write_suite(tmp_path / "suite.yaml", suite))
    problems = {run.name: run.problem for run in loaded.runs}
    assert problems["full"] is None
    assert "lora_rnak" in problems["typo"] and "lora_rank" in problems["typo"]


def test_groups_run_every_method_with_their_own_shared_arguments(tmp_path):
    suite = _minimal()
    suite["base"].pop("model_name_or_path")
    suite["groups"] = {"small": {"model_name_or_path": "a"}, "large": {"model_name_or_path": "b"}}
    suite["methods"] = {
        "full": {"finetuning_type": "full"},
        "galore": {"finetuning_type": "full", "use_galore": True},
        "badam": {"finetuning_type": "full", "use_badam": True},
        "lora": {},
        "freeze": {"finetuning_type": "freeze"},
    }
    loaded = load_suite(_write_suite(tmp_path / "suite.yaml", suite))
    assert [run.name for run in loaded.runs][:2] == ["small/full", "small/galore"]
    assert {run.args["model_name_or_path"] for run in loaded.runs if run.group == "large"} == {"b"}
    kinds = {run.method: run.kind for run in loaded.runs}
    assert kinds == {"full": "full", "galore": "galore", "badam": "badam", "lora": "lora", "freeze": "freeze"}
    fingerprints = {run.fingerprint for run in loaded.runs}
    assert len(fingerprints) == len(loaded.runs)


def test_set_overrides_every_run_over_base_groups_and_methods(tmp_path):
    suite = _minimal(max_steps=100)
    suite["groups"] = {"small": {"max_steps": 50}}
    suite["methods"]["lora"] = {"learning_rate": 1e-4}
    loaded = load_suite(_write_suite(tmp_path / "suite.yaml", suite), settings={"max_steps": 4, "learning_rate": 1e-3})
    assert {(run.args["max_steps"], run.args["learning_rate"]) for run in loaded.runs} == {(4, 1e-3)}
    with pytest.raises(SuiteError, match="--set output_dir"):
        load_suite(tmp_path / "suite.yaml", settings={"output_dir": "x"})
    with pytest.raises(SuiteError, match="'max_step'"):
        load_suite(tmp_path / "suite.yaml", settings={"max_step": 4})


def test_the_command_refuses_a_bad_suite_before_training(tmp_path, capsys):
    from blockllm_factory.cli import main

    suite = _minimal()
    suite["methods"]["full"]["seed"] = 1
    path = _write_suite(tmp_path / "suite.yaml", suite)
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "methods.full.seed" in capsys.readouterr().err
    assert main(["bench", str(_write_suite(path, _minimal())), "--out", str(tmp_path / "out"), "--only", "nope"]) == 2
    assert "--only 'nope'" in capsys.readouterr().err
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--set", "max_steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_rebuilt_local_model_makes_new_runs(tmp_path):
    from blockllm_factory.bench.suite import resolve_paths

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = _write_suite(tmp_path / "suite.yaml", _minimal(model_name_or_path=str(model)))

    def fingerprint() -> str:
        suite = load_suite(path)
        resolve_paths(suite)
        return suite.runs[0].fingerprint

    first = fingerprint()
    assert fingerprint() == first
    (model / "config.json").write_text('{"hidden_size": 8}')
    assert fingerprint() != first


def test_a_method_can_drop_a_base_argument_with_null(tmp_path):
    suite = _minimal(optim="adamw_torch")
    suite["methods"]["plain"] = {"finetuning_type": "full", "optim": None}
    runs = {run.name: run for run in load_suite(_write_suite(tmp_path / "suite.yaml", suite)).runs}
    assert runs["full"].args["optim"] == "adamw_torch"
    assert "optim" not in runs["plain"].args


# ---------------------------------------------------------------- measurement callback


class _Module:
    def __init__(self) -> None:
        self.seen: list = []

        def _training_function(config):
            self.seen.append(list(config["callbacks"]))

        self._training_function = _training_function


def test_the_harness_and_the_patch_agree_on_the_variable():
    from blockllm_factory.bench import runner

    assert runner.METRICS_ENV == metrics.ENV_VAR


def test_the_metrics_patch_is_inert_without_the_harness(monkeypatch):
    monkeypatch.delenv(metrics.ENV_VAR, raising=False)
    module = _Module()
    original = module._training_function
    metrics.apply(module)
    assert module._training_function is original


def test_the_metrics_patch_adds_its_callback_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv(metrics.ENV_VAR, str(tmp_path / "m.json"))
    module = _Module()
    metrics.apply(module)
    metrics.apply(module)  # a second apply does not wrap twice
    module._training_function({"callbacks": []})
    assert len(module.seen) == 1
    assert [type(c).__name__ for c in module.seen[0]] == ["BenchMetricsCallback"]


def _drive(model, optimizer, steps: int, out: Path, trainable=None) -> dict:
    """Calls the callback the way the Trainer does, around real forward/backward/step."""
    from transformers import TrainerControl, TrainerState

    callback = metrics.BenchMetricsCallback(str(out))
    state, control, args = TrainerState(), TrainerControl(), types.SimpleNamespace(world_size=1)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    for step in range(steps):
        callback.on_step_begin(args, state, control)
        inputs = torch.randn(4, 16, dtype=next(model.parameters()).dtype)
        model(inputs).float().pow(2).mean().backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        callback.on_optimizer_step(args, state, control)
        optimizer.zero_grad(set_to_none=True)
        state.global_step = step + 1
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": 1.0 / (step + 1)})
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 0.5})
    callback.on_train_end(args, state, control)
    return json.loads(out.read_text())


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_callback_measures_adamw_from_its_live_tensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    figures = _drive(model, optimizer, steps=3, out=tmp_path / "m.json")
    weights = _nbytes(model.parameters())
    moments = _nbytes(t for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert figures["parameter_bytes"] == weights
    assert figures["gradient_bytes"] == weights  # every parameter had its gradient at the step
    assert moments == 2 * weights
    assert moments <= figures["optimizer_state_bytes"] <= moments + 64 * len(optimizer.state)  # + step counters
    assert figures["master_weight_bytes"] == 0
    assert figures["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert figures["steps"] == 3 and len(figures["step_times_s"]) == 3
    assert [step for step, _ in figures["loss_curve"]] == [1, 2, 3]
    assert figures["eval_curve"] == [[3, 0.5]]


def test_the_callback_counts_optimizer_held_copies_as_master_weights(tmp_path):
    """BAdam's layout: the model in half precision, the optimizer over fp32 copies of the trainable block."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    for param in model[0].parameters():
        param.requires_grad_(False)
    copies = [p.detach().float().requires_grad_(True) for p in model[1].parameters()]
    inner = torch.optim.AdamW(copies, lr=1e-3)

    class CopyingOptimizer(torch.optim.Optimizer):
        def __init__(self) -> None:
            self.base_optimizer = inner
            self.param_groups = inner.param_groups
            self.defaults = inner.defaults

        @property
        def state(self):
            raise AttributeError("no state of its own")

        def step(self, closure=None):
            for copy, param in zip(copies, model[1].parameters()):
                copy.grad = param.grad.float()
            inner.step()
            for copy, param in zip(copies, model[1].parameters()):
                param.data.copy_(copy.data)
                copy.grad = None

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=True)

    figures = _drive(model, CopyingOptimizer(), steps=2, out=tmp_path / "m.json")
    assert figures["master_weight_bytes"] == _nbytes(copies)
    assert figures["parameter_bytes"] == _nbytes(model.parameters())
    # bf16 gradients of the trainable block, and its fp32 copies' gradients inside step()
    assert figures["gradient_bytes"] == _nbytes(model[1].parameters()) + _nbytes(copies)
    assert figures["optimizer_state_bytes"] >= 2 * _nbytes(copies)
    assert figures["trainable_parameters"] == sum(p.numel() for p in model[1].parameters())


# ---------------------------------------------------------------- goals


def _record(name, kind, **values):
    return {"name": name, "kind": kind, "status": "ok", "sparsity": SPARSITY, **values}


def _statuses(records):
    ((_, listed, note),) = report.goals(records)
    return {goal.text: goal.status for goal in listed}, note


def test_goals_are_met_only_when_every_comparison_holds_and_missed_when_one_fails():
    values = {"optimizer_state_bytes": 100, "gradient_bytes": 100, "peak_memory_bytes": 1000, "step_time_s": 1.0}
    values |= {"final_train_loss": 2.0, "eval_loss": 2.0}
    records = [_record(kind, kind, **values) for kind in ("full", "lora", "galore", "badam")]
    small = {"optimizer_state_bytes": 5, "gradient_bytes": 5, "peak_memory_bytes": 900, "step_time_s": 0.7}
    block = _record("blockllm", "blockllm", **small, final_train_loss=1.9, eval_loss=2.1)
    statuses, note = _statuses(records + [block])
    assert note is None
    assert statuses["optimizer-state bytes <= 0.055 x full AdamW's"] == "met"
    assert statuses["peak memory the lowest of the five"] == "met"
    assert statuses["final train loss at or below BAdam's, GaLore's and LoRA's"] == "met"
    assert statuses["eval loss at or below BAdam's, GaLore's and LoRA's"] == "missed"
    records[2] = dict(records[2], status="failed", error="boom")  # galore failed
    statuses, _ = _statuses(records + [block])
    assert statuses["optimizer-state bytes below BAdam's and GaLore's"] == "not measured"
    assert statuses["eval loss at or below BAdam's, GaLore's and LoRA's"] == "missed"  # badam already beats it


def test_goals_say_when_the_run_did_not_use_the_stated_sparsity():
    _, note = _statuses([_record("blockllm", "blockllm", sparsity=0.9)])
    assert "0.9" in note and "0.95" in note


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bench_runs(tiny_llamafactory_assets, tmp_path_factory):
    """Runs the tiny suite twice with the installed console script; returns both outputs and reports."""
    root = tmp_path_factory.mktemp("bench")
    suite = {
        "env": {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        },
        "base": {
            "model_name_or_path": str(tiny_llamafactory_assets.model_dir),
            "dataset_dir": str(tiny_llamafactory_assets.dataset_dir),
            "dataset": "tiny_sft",
            "val_size": 0.25,
            "template": "default",
            "stage": "sft",
            "do_eval": True,
            "eval_strategy": "no",
            "cutoff_len": 64,
            "max_samples": 32,
            "use_cpu": True,
            "seed": 0,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4,
            "max_steps": 6,
            "learning_rate": 1.0e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "preprocessing_num_workers": 1,
            "dataloader_num_workers": 0,
            "overwrite_cache": True,
        },
        "methods": {
            "full": {"finetuning_type": "full"},
            "broken": {"finetuning_type": "no_such_method"},
            "blockllm": {"finetuning_type": "blockllm", "blockllm_sparsity": SPARSITY, "blockllm_patience": 3},
        },
    }
    path = _write_suite(root / "suite.yaml", suite)
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "BLOCKLLM_FACTORY_DISABLE")}

    def bench() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BENCH), "bench", str(path), "--out", str(out)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = bench()
    first_report = json.loads((out / "report.json").read_text())
    result_files = {name: out / "runs" / name / "result.json" for name in ("full", "blockllm")}
    mtimes = {name: path.stat().st_mtime_ns for name, path in result_files.items() if path.exists()}
    second = bench()
    return types.SimpleNamespace(
        out=out,
        first=first,
        second=second,
        first_report=first_report,
        second_report=json.loads((out / "report.json").read_text()),
        mtimes=mtimes,
        result_files=result_files,
    )


def _runs(document: dict) -> dict:
    return {run["name"]: run for run in document["runs"]}


def test_bench_reports_every_run_with_all_fields(bench_runs):
    assert bench_runs.first.returncode == 1, bench_runs.first.stdout + bench_runs.first.stderr  # one run failed
    runs = _runs(bench_runs.first_report)
    assert list(runs) == ["full", "broken", "blockllm"]
    for run in runs.values():
        assert set(RUN_FIELDS) <= set(run), set(RUN_FIELDS) - set(run)
    assert {"cpu_count", "platform", "versions", "peak_memory_sources"} <= set(bench_runs.first_report["machine"])
    for name in ("full", "blockllm"):
        run = runs[name]
        assert run["status"] == "ok", run["error"]
        assert run["error"] is None
        for key in ("peak_memory_bytes", "parameter_bytes", "gradient_bytes", "optimizer_state_bytes"):
            assert isinstance(run[key], int) and run[key] > 0, (name, key, run[key])
        assert run["master_weight_bytes"] >= 0
        assert run["peak_memory_source"] == "cpu_peak_rss"
        assert run["peak_memory_bytes"] >= run["peak_tracked_bytes"] >= run["parameter_bytes"]
        assert run["step_time_s"] > 0 and run["tokens_per_s"] > 0
        steps = [step for step, _ in run["loss_curve"]]
        assert steps == sorted(steps) and steps[-1] == 6
        assert all(math.isfinite(loss) for _, loss in run["loss_curve"])
        assert math.isfinite(run["final_train_loss"]) and math.isfinite(run["eval_loss"])


def test_bench_figures_are_consistent_with_the_methods(bench_runs):
    runs = _runs(bench_runs.first_report)
    full, block = runs["full"], runs["blockllm"]
    # Full fine-tuning in fp32: a gradient per weight, two AdamW moments per weight.
    assert full["trainable_parameters"] == full["total_parameters"]
    assert full["gradient_bytes"] == full["parameter_bytes"]
    assert full["optimizer_state_bytes"] >= 2 * full["parameter_bytes"]
    # The same model, and BlockLLM keeps much less beside it.
    assert block["parameter_bytes"] == full["parameter_bytes"]
    assert block["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert block["gradient_bytes"] < full["gradient_bytes"]
    assert block["optimizer"].endswith("BlockLLM")


def test_bench_blockllm_trains_about_one_minus_sparsity_of_the_eligible_parameters(bench_runs):
    block = _runs(bench_runs.first_report)["blockllm"]
    assert block["status"] == "ok", block["error"]
    expected = (1 - SPARSITY) * block["eligible_parameters"]
    assert block["trainable_parameters"] == pytest.approx(expected, rel=0.1)


def test_bench_records_a_failed_method_and_runs_the_others(bench_runs):
    broken = _runs(bench_runs.first_report)["broken"]
    assert broken["status"] == "failed"
    assert "exit code 1" in broken["error"] and "Error" in broken["error"]
    assert Path(broken["log"]).is_file()
    lines = [line for line in bench_runs.first.stdout.splitlines() if line.startswith("[bench ")]
    finished = [line for line in lines if not line.endswith("train.log)")]
    assert [line.split("]")[0] for line in finished] == ["[bench 1/3", "[bench 2/3", "[bench 3/3"]
    assert "full: ok" in finished[0] and "broken: FAILED" in finished[1] and "blockllm: ok" in finished[2]
    markdown = (bench_runs.out / "report.md").read_text()
    assert "| full | full | ok |" in markdown and "| broken |" in markdown and "## Failed runs" in markdown
    assert "### Goals" in markdown and "blockllm:" in markdown
    for plot in ("loss.png", "memory.png"):
        assert (bench_runs.out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_again_skips_completed_runs_and_retries_the_failed_one(bench_runs):
    assert bench_runs.second.returncode == 1
    lines = [line for line in bench_runs.second.stdout.splitlines() if line.startswith("[bench ")]
    assert any(line.startswith("[bench 1/3] full: skipped") for line in lines)
    assert any(line.startswith("[bench 3/3] blockllm: skipped") for line in lines)
    assert any(line.startswith("[bench 2/3] broken: FAILED") for line in lines)
    for name, path in bench_runs.result_files.items():
        assert path.stat().st_mtime_ns == bench_runs.mtimes[name]
    first, second = _runs(bench_runs.first_report), _runs(bench_runs.second_report)
    for name in ("full", "blockllm"):
        assert second[name] == first[name]

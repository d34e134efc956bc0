"""The site-packages import hook: free for unrelated processes, patches LLaMA-Factory, never breaks an import."""

import json
import subprocess
import sys
import textwrap

import pytest

from blockllm_factory.patches._version import SUPPORTED_RANGE, check_llamafactory_version

DISABLE = "BLOCKLLM_FACTORY_DISABLE"


def python(code: str, *, env_extra: dict[str, str] | None = None, disable: bool = False, cwd=None):
    import os

    env = {key: value for key, value in os.environ.items() if key != DISABLE}
    if disable:
        env[DISABLE] = "1"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


LIST_MODULES = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def test_unrelated_python_start_only_loads_the_tiny_hook(tmp_path):
    hooked = python(LIST_MODULES, cwd=tmp_path)
    opted_out = python(LIST_MODULES, cwd=tmp_path, disable=True)
    assert hooked.returncode == 0 and opted_out.returncode == 0
    assert hooked.stderr == "" and opted_out.stderr == ""
    modules = set(json.loads(hooked.stdout))
    # The .pth line imports the package and the hook module, and the hook itself imports nothing more.
    assert {name for name in modules if name.startswith("blockllm_factory")} == {
        "blockllm_factory",
        "blockllm_factory._import_hook",
    }
    assert not {name.split(".")[0] for name in modules} & {"torch", "llamafactory", "transformers", "numpy"}
    assert modules == set(json.loads(opted_out.stdout))


def test_python_c_pass_is_silent_and_succeeds(tmp_path):
    result = python("pass", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_finder_is_installed_in_every_process_and_the_env_var_opts_out(tmp_path):
    code = "import sys; print(any(type(f).__name__ == '_PatchFinder' for f in sys.meta_path))"
    assert python(code, cwd=tmp_path).stdout.strip() == "True"
    assert python(code, cwd=tmp_path, disable=True).stdout.strip() == "False"


CHECK_PATCHED = """
import llamafactory.hparams as hparams
from blockllm_factory import _import_hook
fields = hparams.FinetuningArguments.__dataclass_fields__
print(json.dumps({"sparsity": "blockllm_sparsity" in fields, "applied": _import_hook.applied,
                  "failures": _import_hook.failures}))
"""


def test_llamafactory_is_patched_on_import_and_left_alone_with_the_opt_out(tmp_path):
    patched = python("import json\n" + CHECK_PATCHED, cwd=tmp_path)
    assert patched.returncode == 0, patched.stderr
    report = json.loads(patched.stdout.strip().splitlines()[-1])
    assert report["sparsity"] is True
    assert "llamafactory.hparams.finetuning_args" in report["applied"]
    assert report["failures"] == {}

    plain = python("import json\n" + CHECK_PATCHED, cwd=tmp_path, disable=True)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout.strip().splitlines()[-1])["sparsity"] is False


def test_a_failing_patch_is_reported_once_and_leaves_modules_as_they_were(tmp_path):
    (tmp_path / "watched_one.py").write_text("VALUE = 1\n")
    (tmp_path / "watched_two.py").write_text("VALUE = 2\n")
    (tmp_path / "broken_patch.py").write_text("def apply(module):\n    raise RuntimeError('boom')\n")
    (tmp_path / "good_patch.py").write_text("def apply(module):\n    module.VALUE = 100\n")
    code = """
    import json
    from blockllm_factory import _import_hook
    _import_hook.WATCHED.update(watched_one="broken_patch", watched_two="good_patch")
    import watched_one, watched_two
    print(json.dumps({"one": watched_one.VALUE, "two": watched_two.VALUE, "failures": sorted(_import_hook.failures)}))
    """
    result = python(code, cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # After a failure the hook stops patching: the second module keeps its own value.
    assert report == {"one": 1, "two": 2, "failures": ["watched_one", "watched_two"]}
    messages = [line for line in result.stderr.splitlines() if line.startswith("blockllm-factory:")]
    assert len(messages) == 1
    assert "watched_one" in messages[0] and "boom" in messages[0] and DISABLE in messages[0]


def test_a_patch_module_that_cannot_be_imported_does_not_break_the_import(tmp_path):
    (tmp_path / "watched_three.py").write_text("VALUE = 3\n")
    code = """
    from blockllm_factory import _import_hook
    _import_hook.WATCHED["watched_three"] = "no_such_patch_module"
    import watched_three
    print(watched_three.VALUE)
    """
    result = python(code, cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert "no_such_patch_module" in result.stderr


def test_blockllm_is_refused_by_name_when_a_patch_failed(tmp_path):
    code = """
    from blockllm_factory import _import_hook
    from llamafactory.hparams import FinetuningArguments
    # As if a later surface had failed after the arguments were patched.
    _import_hook.failures["llamafactory.train.trainer_utils"] = "RuntimeError: simulated"
    FinetuningArguments(finetuning_type="blockllm")
    """
    result = python(code, cwd=tmp_path)
    assert result.returncode != 0
    assert "finetuning_type: blockllm` is unavailable" in result.stderr
    assert "llamafactory.train.trainer_utils" in result.stderr


# --- the gate: a version floor, then the surfaces themselves (patches/_surfaces.py) -------------------------------


@pytest.mark.parametrize("version", ["0.9.4", "0.8.3", "unknown"])
def test_versions_older_than_the_minimum_are_refused_naming_it(version):
    with pytest.raises(RuntimeError) as error:
        check_llamafactory_version(version)
    assert version in str(error.value) and SUPPORTED_RANGE in str(error.value)


@pytest.mark.parametrize("version", ["0.9.5", "0.9.5.dev0", "0.9.5.post1", "0.9.6.dev0", "0.10.0"])
def test_the_minimum_and_newer_versions_are_left_to_the_surface_check(version):
    assert check_llamafactory_version(version) == version


ALL_WATCHED = """
import importlib, json
from blockllm_factory import _import_hook

for name in _import_hook.WATCHED:  # some are imported lazily by LLaMA-Factory (the DPO trainer, the web UI)
    importlib.import_module(name)
print(json.dumps({"applied": sorted(_import_hook.applied), "failures": _import_hook.failures}))
"""


def test_every_watched_module_of_the_installed_versions_has_its_surfaces_and_is_patched(tmp_path):
    from blockllm_factory._import_hook import WATCHED
    from blockllm_factory.patches._surfaces import SURFACES

    assert set(SURFACES) == set(WATCHED)  # no surface without a check
    result = python(ALL_WATCHED, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"applied": sorted(WATCHED), "failures": {}}


SIMULATED_NEWER = """
import json, sys
import llamafactory

llamafactory.__version__ = "0.9.6.dev0"  # what LLaMA-Factory's main branch reports; these surfaces are unchanged there
from blockllm_factory import _import_hook
from llamafactory.train.tuner import run_exp

run_exp(json.loads(sys.argv[1]))
print(json.dumps({"failures": _import_hook.failures, "version": llamafactory.__version__}))
"""


def test_a_newer_version_with_unchanged_surfaces_trains_with_blockllm(llamafactory_cli, tmp_path):
    config = llamafactory_cli.config(tmp_path / "out", max_steps=2, blockllm_sparsity=0.5)
    result = llamafactory_cli.python(SIMULATED_NEWER, tmp_path, argv=[json.dumps(config)])
    assert result.returncode == 0, result.log[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"failures": {}, "version": "0.9.6.dev0"}
    assert "Using BlockLLM optimizer" in result.log
    assert (tmp_path / "out" / "blockllm_selection.jsonl").read_text().strip()


# A release that changed a surface, simulated from outside: sitecustomize runs after the .pth hook is installed and
# changes the watched module right before its patch would run.
BREAK_SURFACE = """
import os
from blockllm_factory import _import_hook

_apply = _import_hook._apply
BREAK = os.environ["BLOCKLLM_TEST_BREAK"]


def _apply_to_a_changed_release(fullname, module):
    if BREAK == "arguments" and fullname == "llamafactory.hparams.finetuning_args":
        del module.FreezeArguments  # as if renamed
    if BREAK == "adapter" and fullname == "llamafactory.model.adapter":
        original = module.init_adapter
        module.init_adapter = lambda config, model, model_args, finetuning_args: original(
            config, model, model_args, finetuning_args, True
        )  # as if is_trainable had been dropped
    _apply(fullname, module)


_import_hook._apply = _apply_to_a_changed_release
"""
BROKEN = {
    "arguments": (
        "llamafactory.hparams.finetuning_args",
        "patches/arguments.py needs `llamafactory.hparams.finetuning_args.FreezeArguments` (missing)",
    ),
    "adapter": (
        "llamafactory.model.adapter",
        "patches/adapter.py needs `llamafactory.model.adapter.init_adapter(config, model, model_args, "
        "finetuning_args, is_trainable)` (found (config, model, model_args, finetuning_args))",
    ),
}
PARSE_FORMS = """
import json, sys
import llamafactory.train.tuner  # as llamafactory-cli train: every training module imported before parsing
from llamafactory.hparams import get_train_args

config = json.loads(sys.argv[1])
argv = [word for key, value in config.items() for word in (f"--{key}", str(value))]
results = {}
for form, args in (("yaml", config), ("command line", argv), ("full", {**config, "finetuning_type": "full"})):
    try:
        get_train_args(args)
        results[form] = "accepted"
    except Exception as error:
        results[form] = f"{type(error).__name__}: {error}"
print(json.dumps(results))
"""


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_changed_surface_is_named_when_blockllm_is_requested(broken, llamafactory_cli, tmp_path):
    module, needs = BROKEN[broken]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BREAK_SURFACE)
    env = {"PYTHONPATH": str(tmp_path / "site"), "BLOCKLLM_TEST_BREAK": broken}
    config = llamafactory_cli.config(tmp_path / "out", max_steps=1)
    unavailable = (
        f"RuntimeError: `finetuning_type: blockllm` is unavailable: blockllm-factory could not patch {module}"
    )

    # The user's command: the import-time report on stderr, then the refusal, before any model loads.
    result = llamafactory_cli.run("train", config, tmp_path, "train", timeout=300, **env)
    assert result.returncode != 0
    reports = [line for line in result.stderr.splitlines() if line.startswith("blockllm-factory: could not patch")]
    assert len(reports) == 1 and module in reports[0] and needs in reports[0]
    assert unavailable in result.log and needs in result.log
    assert "Invalid fine-tuning method" not in result.log and "invalid choice" not in result.log
    assert "trainable params" not in result.log

    if broken != "arguments":
        return
    # Every form of the arguments gets the same message (not argparse's "invalid choice"); other methods parse.
    parsed = llamafactory_cli.python(PARSE_FORMS, tmp_path, argv=[json.dumps(config)], **env)
    assert parsed.returncode == 0, parsed.log[-4000:]
    results = json.loads(parsed.stdout.strip().splitlines()[-1])
    assert results["yaml"].startswith(unavailable) and needs in results["yaml"]
    assert results["command line"] == results["yaml"]
    assert results["full"] == "accepted"


def test_a_library_surface_is_named_with_its_version(monkeypatch):
    import llamafactory.train.sft.trainer as sft_trainer
    import transformers

    from blockllm_factory.patches._surfaces import check_surfaces

    check_surfaces("llamafactory.train.sft.trainer", sft_trainer)  # the installed transformers has it
    monkeypatch.delattr(transformers.Trainer, "_clip_grad_norm")
    with pytest.raises(RuntimeError) as error:
        check_surfaces("llamafactory.train.sft.trainer", sft_trainer)
    message = str(error.value)
    assert f"transformers {transformers.__version__}" in message
    assert "patches/trainer.py needs `transformers.Trainer._clip_grad_norm` (missing)" in message


def test_deepspeed_surfaces_are_checked_for_deepspeed_runs(monkeypatch):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from blockllm_factory.patches._surfaces import check_deepspeed_surfaces

    check_deepspeed_surfaces()
    monkeypatch.delattr(DeepSpeedZeroOptimizer_Stage3, "get_param_id")
    with pytest.raises(RuntimeError) as error:
        check_deepspeed_surfaces()
    assert "needs `deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.get_param_id` (missing)" in str(
        error.value
    )

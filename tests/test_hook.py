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


@pytest.mark.parametrize("version", ["0.9.4", "0.9.6", "0.10.0", "1.0.0"])
def test_unsupported_llamafactory_versions_are_refused_naming_the_range(version):
    with pytest.raises(RuntimeError) as error:
        check_llamafactory_version(version)
    assert version in str(error.value) and SUPPORTED_RANGE in str(error.value)


@pytest.mark.parametrize("version", ["0.9.5", "0.9.5.dev0", "0.9.5.post1"])
def test_the_tested_release_line_is_accepted(version):
    assert check_llamafactory_version(version) == version

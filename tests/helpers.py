"""What the tests share that is not a fixture: the CLI's environment, LLaMA-Factory arguments for the tiny assets, runs
of ``llamafactory-cli`` in a subprocess, and the entries of docs/bad_inputs.md.

A plain module (pytest puts ``tests/`` on ``sys.path`` for its test files and conftest.py alike): test files import
it as ``from helpers import ...``; the fixtures that build the assets stay in conftest.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("llamafactory-cli")
BAD_INPUTS = ROOT / "docs" / "bad_inputs.md"


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment scrubbed for a CPU run of the CLI, offline, then updated by ``extra``.

    The virtual environment's ``bin/`` comes first on ``PATH``, as when it is activated: ``llamafactory-cli`` starts
    ``torchrun`` by name (README). Launcher and hook switches a developer may have exported are dropped."""
    env = dict(os.environ)
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "BLOCKLLM_FACTORY_DISABLE", "GRADIO_SHARE"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_DISABLED="true",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PATH=os.pathsep.join([str(CLI.parent), env.get("PATH", "")]),
    )
    env.update(extra)
    return env


def tiny_config(assets, output_dir: Path, **overrides) -> dict:
    """LLaMA-Factory arguments on ``assets`` (anything with ``model_dir`` and ``dataset_dir``): a few-step CPU
    training run of ``finetuning_type: blockllm`` into ``output_dir``, updated by ``overrides``. Tests that only parse
    arguments use the same dict (see :func:`parse_args`)."""
    config = {
        "model_name_or_path": str(assets.model_dir),
        "dataset_dir": str(assets.dataset_dir),
        "template": "default",
        "stage": "sft",
        "do_train": True,
        "dataset": "tiny_sft",
        "finetuning_type": "blockllm",
        "cutoff_len": 64,
        "max_samples": 32,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "preprocessing_num_workers": 1,
        "overwrite_cache": True,
        "output_dir": str(output_dir),
    }
    config.update(overrides)
    return config


def parse_args(assets, output_dir: Path, **overrides):
    """LLaMA-Factory's own ``get_train_args`` on :func:`tiny_config`, in this process: every parse-time check runs,
    no model loads. Returns its ``(model, data, training, finetuning, generating)`` arguments."""
    from llamafactory.hparams import get_train_args

    return get_train_args(tiny_config(assets, output_dir, **overrides))


def reselecting_config(assets, output_dir: Path, *, steps: int, save_steps: int, **overrides) -> dict:
    """:func:`tiny_config` for a short run whose loss rule fires often (sparsity 0.8, patience 1, a large rate on a
    cosine schedule: reselections within a few steps) and that saves a checkpoint every ``save_steps``: the runs that
    resume and multi-process tests compare."""
    settings = {
        "blockllm_sparsity": 0.8,
        "blockllm_patience": 1,
        "max_samples": 64,
        "gradient_accumulation_steps": 2,
        "max_steps": steps,
        "lr_scheduler_type": "cosine",
        "save_strategy": "steps",
        "save_steps": save_steps,
    }
    return tiny_config(assets, output_dir, **{**settings, **overrides})


def run_logged(argv: list[str], cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """Runs ``argv`` with :func:`cli_env` (plus ``env``); the CompletedProcess gets ``.log`` (both streams)."""
    result = subprocess.run(argv, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
    result.log = result.stdout + result.stderr
    return result


def run_cli(command: str, config: dict, workdir: Path, name: str, timeout: int = 600, **env: str):
    """Runs ``llamafactory-cli <command> <workdir>/<name>.yaml``; the CompletedProcess gets ``.log`` (both streams)."""
    path = Path(workdir) / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is valid YAML
    return run_logged([str(CLI), command, str(path)], workdir, timeout, **env)


def spawn_ranks(worker, args: tuple, directory: Path, world: int = 2) -> Path:
    """Runs ``worker(rank, world, init_file, out_dir, *args)`` in ``world`` processes (``torch.multiprocessing.spawn``)
    and returns ``out_dir``, where each rank saved ``rank<N>.pt``.

    Once more from scratch on the known teardown flake: a rank aborts in C++ teardown (SIGABRT) after every rank saved
    its results; any other failure stands."""
    import torch.multiprocessing

    for attempt in range(2):
        out = Path(directory) / f"attempt{attempt}"
        out.mkdir()
        try:
            torch.multiprocessing.spawn(worker, args=(world, str(out / "init"), str(out), *args), nprocs=world)
            return out
        except torch.multiprocessing.ProcessExitedException as error:
            saved = all((out / f"rank{rank}.pt").exists() for rank in range(world))
            if attempt or error.signal_name != "SIGABRT" or not saved:
                raise
            print(f"rank aborted in teardown after saving (attempt {attempt + 1}); running again")
    raise AssertionError("unreachable")


def exit_rank() -> None:
    """The end of a :func:`spawn_ranks` worker that saved its results and tore its process group down: leave without
    the interpreter's exit, where a C++ destructor of torch/gloo sometimes aborts the process ("terminate called
    without an active exception", SIGABRT) after everything succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def bad_inputs(kind: str) -> dict[str, str]:
    """The entries ``<!-- kind: NAME -->`` of docs/bad_inputs.md (``case`` or ``warning``): NAME -> the text of the
    first ``text`` block after it (``{...}`` stands for a value that varies)."""
    text = BAD_INPUTS.read_text(encoding="utf-8")
    return dict(re.findall(rf"<!-- {kind}: (\S+) -->.*?```text\n(.*?)\n```", text, flags=re.DOTALL))


def documented_pattern(documented: str) -> re.Pattern:
    """A pattern that matches ``documented`` with each ``{...}`` standing for any text."""
    parts = re.split(r"\{[^{}]*\}", documented)
    return re.compile(".*?".join(re.escape(part) for part in parts), flags=re.DOTALL)

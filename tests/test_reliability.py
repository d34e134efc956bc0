"""Reliability of BlockLLM training in one process: exact resume, processes killed mid-step and mid-save, checkpoints
that cannot be resumed exactly (refused by name), non-finite steps and fp16 loss scaling. (Resume under DDP and
DeepSpeed ZeRO-2 is in test_distributed.py.)

Faults are injected from outside the product: a ``sitecustomize.py`` put on ``PYTHONPATH`` for the training process
kills it in a forward pass or while it writes a checkpoint file, records the output folder as a kill at each file of
a save would leave it, or turns one training loss into NaN.
"""

import io
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import bad_inputs, documented_pattern, parse_args, reselecting_config, run_cli
from safetensors.torch import load_file
from test_optim import TinyLM, flat_params, lm_loss, make_batches

from blockllm_factory.optim import BlockLLM

STEPS = 6

FAULTS = '''
"""Test-only fault injection (tests/test_reliability.py), loaded at interpreter start through PYTHONPATH."""
import builtins
import io
import os
import re
import shutil
import signal

import safetensors.torch
import torch

# A file of a checkpoint folder, by the name it will have: write_atomic's temporary ".NAME-XXXXXXXX.SUFFIX" counts as
# NAME.SUFFIX (blockllm_checkpoint.json is written that way).
_CHECKPOINT_FILE = re.compile(r"^(?P<folder>.*[/\\\\]checkpoint-[0-9]+)[/\\\\](?P<name>[^/\\\\]+)$")
_TEMPORARY = re.compile(r"^[.](?P<stem>.+)-[a-z0-9_]{8}(?P<suffix>[.][^.]+)$")
_kill_when_saving = os.environ.get("BLOCKLLM_TEST_KILL_WHEN_SAVING")  # NAME: the first checkpoint's file NAME
_snapshots = os.environ.get("BLOCKLLM_TEST_SNAPSHOT_SAVES")  # a folder: each file of the first save, as if killed
_snapshot_folder = []


def _checkpoint_file(path):
    if not isinstance(path, (str, os.PathLike)):
        return None
    match = _CHECKPOINT_FILE.match(os.fspath(path))
    if match is None:
        return None
    name = match.group("name")
    temporary = _TEMPORARY.match(name)
    return match.group("folder"), (temporary.group("stem") + temporary.group("suffix")) if temporary else name


def _snapshot(folder, name, path):
    """The output folder as a kill right now would leave it: this checkpoint's files so far, the one being
    written cut short, the other checkpoints (linked)."""
    if _snapshot_folder and _snapshot_folder[0] != folder:
        return
    _snapshot_folder[:1] = [folder]
    index = len(os.listdir(_snapshots))
    target = os.path.join(_snapshots, f"{index:02d}-{name}")
    os.makedirs(target)
    checkpoint = os.path.join(target, os.path.basename(folder))
    shutil.copytree(folder, checkpoint)
    with builtins._blockllm_open(os.path.join(checkpoint, os.path.basename(os.fspath(path))), "wb") as handle:
        handle.write(b"partial")
    parent = os.path.dirname(folder)
    for sibling in os.listdir(parent):
        if sibling.startswith("checkpoint-") and os.path.join(parent, sibling) != folder:
            os.symlink(os.path.join(parent, sibling), os.path.join(target, sibling))


def _before_write(path):
    found = _checkpoint_file(path)
    if found is None:
        return
    folder, name = found
    if _snapshots:
        _snapshot(folder, name, path)
    if _kill_when_saving and name == _kill_when_saving:
        with builtins._blockllm_open(path, "wb") as handle:  # half a file, then the process dies (OOM killer)
            handle.write(b"partial")
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


if _kill_when_saving or _snapshots:
    builtins._blockllm_open = _open = builtins.open
    _save, _save_file = torch.save, safetensors.torch.save_file

    def save(obj, f, *args, **kwargs):
        _before_write(f)
        return _save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        _before_write(filename)
        return _save_file(tensors, filename, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax"):
            _before_write(file)
        return _open(file, mode, *args, **kwargs)

    torch.save, safetensors.torch.save_file = save, save_file
    builtins.open = io.open = open_

_kill_at_call = int(os.environ.get("BLOCKLLM_TEST_KILL_AT_LOSS_CALL", "0"))  # killed in that forward: mid-step
_nan_at_call = int(os.environ.get("BLOCKLLM_TEST_NAN_AT_LOSS_CALL", "0"))
if _nan_at_call or _kill_at_call:
    import torch.nn.functional as functional

    _cross_entropy = functional.cross_entropy
    _calls = [0]

    def cross_entropy(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == _kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = _cross_entropy(*args, **kwargs)
        return loss * float("nan") if _calls[0] == _nan_at_call else loss

    functional.cross_entropy = cross_entropy
'''


def _config(assets, output_dir: Path, **extra) -> dict:
    return reselecting_config(
        assets,
        output_dir,
        steps=STEPS,
        save_steps=3,
        learning_rate=2.0e-2,  # large enough for the loss to stall now and then: reselections
        **extra,
    )


def train(config: dict, workdir: Path, name: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``llamafactory-cli train`` on ``config`` with the fault injection of ``env`` armed (FAULTS)."""
    faults = workdir / "faults"
    faults.mkdir(exist_ok=True)
    (faults / "sitecustomize.py").write_text(FAULTS, encoding="utf-8")
    result = run_cli("train", config, workdir, name, PYTHONPATH=str(faults), **env)
    if check:
        assert result.returncode == 0, result.log[-6000:]
    return result


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=False)


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def assert_same_parameter_states(actual: dict, expected: dict) -> None:
    """Every per-parameter entry (Adam moments, step) of ``expected``'s optimizer state is the same in ``actual``."""
    for index, state in expected["state"].items():
        for key, value in state.items():
            saved = actual["state"][index][key]
            assert torch.equal(saved, value) if torch.is_tensor(value) else saved == value


@pytest.fixture(scope="module")
def unbroken(tiny_llamafactory_assets, tmp_path_factory):
    """One single-process run of the recipe, checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("reliability")
    config = _config(tiny_llamafactory_assets, root / "unbroken")
    result = train(config, root, "unbroken")
    return {"root": root, "config": config, "log": result.log, "output_dir": root / "unbroken"}


def test_resumed_run_ends_bit_identical_to_the_unbroken_one(unbroken):
    root = unbroken["root"]
    events = optimizer_state(unbroken["output_dir"] / "checkpoint-6")["blockllm"]["events"]
    assert len(events) >= 2 and events[-1]["step"] > 3, "expected a reselection after the checkpoint"
    config = dict(unbroken["config"], output_dir=str(root / "resumed"))
    config["resume_from_checkpoint"] = str(unbroken["output_dir"] / "checkpoint-3")
    result = train(config, root, "resumed")
    assert "Resuming training from checkpoint" in result.log
    assert_same_weights(model_weights(root / "resumed"), model_weights(unbroken["output_dir"]))
    resumed_state = optimizer_state(root / "resumed" / "checkpoint-6")
    unbroken_state = optimizer_state(unbroken["output_dir"] / "checkpoint-6")
    assert resumed_state["blockllm"]["events"] == events
    assert resumed_state["blockllm"]["norms"] == unbroken_state["blockllm"]["norms"]
    assert_same_parameter_states(resumed_state, unbroken_state)
    # fp32 moments (tests/test_integration.py resumes 8-bit ones), and the same selection log from the resumed run
    saved = optimizer_state(unbroken["output_dir"] / "checkpoint-3")["state"].values()
    moments = [state["exp_avg"] for state in saved if "exp_avg" in state]
    assert moments and all(moment.dtype == torch.float32 for moment in moments)
    assert not any("exp_avg_q" in state for state in saved)
    selection_log = "blockllm_selection.jsonl"
    assert (root / "resumed" / selection_log).read_text() == (unbroken["output_dir"] / selection_log).read_text()


# The files of one checkpoint save, in the order the Trainer writes them (save_model, then the optimizer's files with
# BlockLLM's record beside them, trainer_state.json last); the fault-injection test checks a kill during each.
SAVED_FILES = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "blockllm_checkpoint.json",
    "rng_state.pth",
    "trainer_state.json",
)


def test_runs_killed_at_random_points_resume_exactly(unbroken):
    """Faults at seeded random points, each in its own process, with the same command rerun after each: killed in the
    middle of an optimizer step, then killed while writing one file of a checkpoint, then run to the end. Every
    rerun resumes by itself from the last complete checkpoint, and the end is the unbroken run's, bit for bit:
    weights, selection history and the optimizer's per-parameter states.

    The last run also records, at the start of each file of its first save, the output folder as a kill at that
    moment would leave it; the resume decision taken at parse time is checked on every one of them (the real resume
    from such a decision is what the reruns above show)."""
    import random

    from blockllm_factory.patches.checkpoints import check_resume_checkpoint, is_complete

    rng = random.Random(19)
    root = unbroken["root"]
    output = root / "faults_run"
    config = dict(unbroken["config"], output_dir=str(output), save_steps=2)  # checkpoints 2, 4, 6
    # Two forward passes (loss calls) per optimizer step: calls 5-8 are steps 3 and 4, after checkpoint-2.
    killed_in_step = train(
        config, root, "faults_step", check=False, BLOCKLLM_TEST_KILL_AT_LOSS_CALL=str(rng.randint(5, 8))
    )
    assert killed_in_step.returncode != 0 and (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (output / "checkpoint-4").exists()

    file = rng.choice(SAVED_FILES)
    killed_saving = train(config, root, "faults_save", check=False, BLOCKLLM_TEST_KILL_WHEN_SAVING=file)
    assert killed_saving.returncode != 0, killed_saving.log[-3000:]
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in killed_saving.log
    broken = output / "checkpoint-4"
    partial = [path.name for path in broken.iterdir() if path.read_bytes() == b"partial"]
    assert len(partial) == 1 and not is_complete(str(broken)), (file, partial)

    snapshots = root / "faults_snapshots"
    snapshots.mkdir()
    finished = train(config, root, "faults_end", BLOCKLLM_TEST_SNAPSHOT_SAVES=str(snapshots))
    assert "checkpoint-4 is incomplete" in finished.log and "resuming from" in finished.log
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in finished.log
    assert_same_weights(model_weights(output), model_weights(unbroken["output_dir"]))
    unbroken_state = optimizer_state(unbroken["output_dir"] / "checkpoint-6")
    resumed_state = optimizer_state(output / "checkpoint-6")
    assert resumed_state["blockllm"]["events"] == unbroken_state["blockllm"]["events"]
    assert_same_parameter_states(resumed_state, unbroken_state)
    selection_log = "blockllm_selection.jsonl"
    assert (output / selection_log).read_text() == (unbroken["output_dir"] / selection_log).read_text()

    # A kill at the start of each file of a save: automatic resume falls back to checkpoint-2, with a warning.
    killed_at = sorted(snapshots.iterdir())
    assert set(SAVED_FILES) <= {folder.name.split("-", 1)[1] for folder in killed_at}
    for folder in killed_at:
        args = SimpleNamespace(
            resume_from_checkpoint=None,
            do_train=True,
            output_dir=str(folder),
            overwrite_output_dir=False,
            deepspeed=None,
        )
        warnings = []
        check_resume_checkpoint(args, SimpleNamespace(warning_rank0=warnings.append), None)
        assert args.resume_from_checkpoint == str(folder / "checkpoint-2"), folder.name
        assert len(warnings) == 1 and "checkpoint-4 is incomplete" in warnings[0], folder.name


def test_checkpoints_carry_checksums_and_a_damaged_one_is_refused_before_the_model_loads(
    unbroken, tiny_llamafactory_assets
):
    """The real training path writes blockllm_checkpoint.json; flipped bytes in optimizer.pt (a file that still
    reads, and before trained on to weights of 2e6) and NaN saved into the moments are refused at parse time, naming
    the file."""
    import json
    import shutil

    saved = unbroken["output_dir"] / "checkpoint-3"
    record = json.loads((saved / "blockllm_checkpoint.json").read_text())
    assert set(record["sha256"]) == {"optimizer.pt", "scheduler.pt"}
    assert record["settings"]["blockllm_sparsity"] == 0.8
    # `auto` is recorded as what it resolved to on the real path (a resume naming it by hand is then the same setting)
    assert isinstance(record["settings"]["blockllm_include_embeddings"], bool)
    copy = unbroken["root"] / "damaged" / "checkpoint-3"
    shutil.copytree(saved, copy)
    data = bytearray((copy / "optimizer.pt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (copy / "optimizer.pt").write_bytes(bytes(data))
    parse = {key: value for key, value in unbroken["config"].items() if key.startswith("blockllm_")}
    with pytest.raises(ValueError, match=r"optimizer.pt does not match the checksum saved with it"):
        parse_args(tiny_llamafactory_assets, copy.parent / "out", resume_from_checkpoint=str(copy), **parse)

    state = optimizer_state(saved)
    moments = next(entry for entry in state["state"].values() if "exp_avg" in entry)
    moments["exp_avg_sq"].fill_(float("nan"))
    torch.save(state, copy / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer.pt does not match the checksum saved with it"):
        parse_args(tiny_llamafactory_assets, copy.parent / "out", resume_from_checkpoint=str(copy), **parse)
    # A checkpoint saved before checksums existed is still resumed (the optimizer's own checks refuse the NaN state
    # when it loads: the `state_dict_nonfinite` case).
    (copy / "blockllm_checkpoint.json").unlink()
    parse_args(tiny_llamafactory_assets, copy.parent / "out", resume_from_checkpoint=str(copy), **parse)


def test_nonfinite_step_is_skipped_with_a_warning_and_training_goes_on(unbroken):
    """A NaN loss at optimizer step 4: weights, moments and selection after it equal those after step 3."""
    root = unbroken["root"]
    config = dict(
        unbroken["config"], output_dir=str(root / "nan"), gradient_accumulation_steps=1, save_steps=1, max_steps=5
    )
    result = train(config, root, "nan", BLOCKLLM_TEST_NAN_AT_LOSS_CALL="4")
    assert "BlockLLM: optimizer step 4 skipped (non-finite loss or gradient)" in result.log
    assert "non-finite gradient at optimizer step 4" in result.log  # BlockLLM's own RuntimeWarning
    checkpoints = {step: root / "nan" / f"checkpoint-{step}" for step in (3, 4, 5)}
    assert_same_weights(model_weights(checkpoints[4]), model_weights(checkpoints[3]))
    before, after = optimizer_state(checkpoints[3]), optimizer_state(checkpoints[4])
    for key in ("selected", "probed", "visits", "norms", "losses", "events", "step", "reselections"):
        assert after["blockllm"][key] == before["blockllm"][key], key
    assert torch.equal(after["blockllm"]["rng_state"], before["blockllm"]["rng_state"])
    assert after["blockllm"]["skipped_steps"] == before["blockllm"]["skipped_steps"] + 1 == 1
    assert after["state"].keys() == before["state"].keys()
    assert_same_parameter_states(after, before)
    # Training went on: step 5 changed the weights again and the model is finite.
    final = model_weights(checkpoints[5])
    assert any(not torch.equal(final[name], tensor) for name, tensor in model_weights(checkpoints[4]).items())
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


# ------------------------------------------------------------------------------------------------ fp16 loss scaling
def _train_scaled(batches, inf_at: int | None = None, scaled: bool = True, compact: bool = True):
    """BlockLLM under torch.amp.GradScaler on CPU (LLaMA-Factory has no loss scaling on CPU: accelerate gives fp16
    on CPU no GradScaler). The skip handling is what the trainer patch does: ``skip_step`` when the scaler skipped."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(
        model.named_parameters(), lr=1e-2, sparsity=0.9, patience=1, probe_blocks=2, compact_gradients=compact
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) if scaled else None
    if scaler is not None:
        optimizer.probe_grad_scale = scaler.get_scale
    for index, tokens in enumerate(batches):
        handle = None
        if index == inf_at:  # an overflow in one gradient coordinate, as backward produces it
            poisoned = next(param for param in model.parameters() if param.requires_grad)
            handle = poisoned.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("inf")))
        loss = lm_loss(model, tokens)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if handle is not None:
            handle.remove()
        optimizer.record_loss(loss.item())
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler found inf/NaN and did not call step()
                optimizer.skip_step("inf/NaN gradients found by the loss scaler")
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scaler


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_grad_scaler_steps_equal_unscaled_steps_bit_for_bit(compact):
    """Probed blocks are measured on scaled gradients; BlockLLM divides by the scale, so the norm table, the
    selections and the weights equal those of an unscaled run exactly (power-of-two scales are exact)."""
    batches = make_batches(8, seed=3)
    plain_model, plain, _ = _train_scaled(batches, scaled=False, compact=compact)
    scaled_model, scaled, scaler = _train_scaled(batches, compact=compact)
    assert scaler.get_scale() > 2.0**12  # the scale grew during the run: several different scales were used
    assert len(plain.selection_events) >= 2
    assert scaled.selection_events == plain.selection_events
    assert scaled.norm_table == plain.norm_table
    assert_same_weights(flat_params(scaled_model), flat_params(plain_model))


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_grad_scaler_skip_leaves_states_and_selection_as_if_the_batch_never_came(compact):
    batches = make_batches(8, seed=3)
    skipped_model, skipped, scaler = _train_scaled(batches, inf_at=3, compact=compact)
    assert skipped.skipped_steps == 1
    # The run without the poisoned batch, with the same (halved) scale afterwards, is equal bit for bit: nothing of
    # the skipped step (moments, selection, probe norms, loss) leaked into the run.
    reference_model, reference, _ = _train_scaled(batches[:3] + batches[4:], scaled=False, compact=compact)
    assert skipped.selection_events == reference.selection_events
    assert skipped.norm_table == reference.norm_table
    assert_same_weights(flat_params(skipped_model), flat_params(reference_model))


# ------------------------------------------------------------------------------------------------ refused inputs
# Every case of docs/bad_inputs.md, by its id: a function that must raise the documented error. Arguments go through
# LLaMA-Factory's own parser (get_train_args) where a single process can reach the check; multi-process and DeepSpeed
# checks, and the optimizer's own, are called directly with the values that a launch would give them.


def _ddp_args(**values):
    defaults = {
        "fsdp": None,
        "deepspeed": None,
        "world_size": 2,
        "ddp_find_unused_parameters": None,
        "ddp_static_graph": None,
        "resume_from_checkpoint": None,
        "do_train": True,
        "output_dir": "unused-output-dir",
    }
    model_args = SimpleNamespace(disable_gradient_checkpointing=True, use_reentrant_gc=True)
    return model_args, SimpleNamespace(), SimpleNamespace(**{**defaults, **values})


def _ds(config):
    from blockllm_factory.hf.deepspeed_config import check_deepspeed_config

    base = {"zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2}}
    check_deepspeed_config({**base, **config})


def _tiny_named_params():
    torch.manual_seed(0)
    return list(TinyLM(width=8, depth=1).named_parameters())


def _checkpoints(tmp_path, steps_complete):
    for step, complete in steps_complete:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def _resume(tmp_path, explicit, finetuning_args=None):
    from blockllm_factory.patches.checkpoints import check_resume_checkpoint

    _, _, args = _ddp_args(resume_from_checkpoint=explicit, output_dir=str(tmp_path), overwrite_output_dir=False)
    check_resume_checkpoint(args, None, finetuning_args)
    return args


BLOCK_SETTINGS = {
    "blockllm_sparsity": 0.8,
    "blockllm_block_size": "head",
    "blockllm_include_embeddings": False,
    "blockllm_norms": "select",
}


def _saved_checkpoint(folder: Path, without=(), record=True, **files: bytes) -> Path:
    """A complete checkpoint of small real files (``files`` replace some), with its blockllm_checkpoint.json."""
    from blockllm_factory.patches.checkpoints import write_checkpoint_record

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if name not in without:
            torch.save({"saved": torch.arange(4.0)}, folder / name)
    if record:
        write_checkpoint_record(str(folder), SimpleNamespace(**BLOCK_SETTINGS))
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def _resume_saved(tmp_path, finetuning_args=None, **checkpoint):
    explicit = _saved_checkpoint(tmp_path / "checkpoint-2", **checkpoint)
    _resume(tmp_path, str(explicit), finetuning_args)


def test_include_embeddings_left_at_auto_resumes_with_the_checkpoints_value(tmp_path):
    """Before, a run saved with `blockllm_include_embeddings: false` (the default until session 36) was refused on
    resume under the new default `auto`, as if the user had changed the field; now `auto` takes the checkpoint's value
    and says so. A value set by hand that differs is still refused (`resume_changed_setting`)."""
    from blockllm_factory.patches.checkpoints import check_resume_checkpoint

    checkpoint = _saved_checkpoint(tmp_path / "checkpoint-2")
    lines = []
    finetuning_args = SimpleNamespace(**{**BLOCK_SETTINGS, "blockllm_include_embeddings": "auto"})
    _, _, args = _ddp_args(
        resume_from_checkpoint=str(checkpoint), output_dir=str(tmp_path), overwrite_output_dir=False
    )
    check_resume_checkpoint(args, SimpleNamespace(info_rank0=lines.append), finetuning_args)
    assert finetuning_args.blockllm_include_embeddings is False
    assert lines == [
        f"`blockllm_include_embeddings: auto` resumes {checkpoint} with the checkpoint's "
        "`blockllm_include_embeddings: False`."
    ]
    finetuning_args.blockllm_include_embeddings = True
    with pytest.raises(ValueError, match="`blockllm_include_embeddings: True` differs from the checkpoint's"):
        check_resume_checkpoint(args, SimpleNamespace(info_rank0=lines.append), finetuning_args)


@pytest.mark.parametrize("resolved", [True, False])
def test_a_record_holds_what_auto_resolved_to_so_naming_it_by_hand_resumes(tmp_path, resolved):
    """Before, a run saved under `blockllm_include_embeddings: auto` recorded `auto`, and a resume that wrote the value
    `auto` had meant (e.g. `true`) was refused as a changed setting. Now the record holds the optimizer's value; a
    record of `auto` (written before) leaves the decision to the optimizer's load check (`state_dict_embeddings`)."""
    import json

    from blockllm_factory.patches.checkpoints import check_resume_checkpoint, write_checkpoint_record

    checkpoint = _saved_checkpoint(tmp_path / "checkpoint-2", record=False)
    settings = {**BLOCK_SETTINGS, "blockllm_include_embeddings": "auto"}
    write_checkpoint_record(str(checkpoint), SimpleNamespace(**settings), SimpleNamespace(include_embeddings=resolved))
    record = json.loads((checkpoint / "blockllm_checkpoint.json").read_text())
    assert record["settings"]["blockllm_include_embeddings"] is resolved
    _, _, args = _ddp_args(
        resume_from_checkpoint=str(checkpoint), output_dir=str(tmp_path), overwrite_output_dir=False
    )
    named = SimpleNamespace(**{**settings, "blockllm_include_embeddings": resolved})
    check_resume_checkpoint(args, None, named)
    assert named.blockllm_include_embeddings is resolved
    with pytest.raises(ValueError, match=f"`blockllm_include_embeddings: {not resolved}` differs from the checkpoint"):
        check_resume_checkpoint(
            args, None, SimpleNamespace(**{**settings, "blockllm_include_embeddings": not resolved})
        )
    write_checkpoint_record(str(checkpoint), SimpleNamespace(**settings))  # no optimizer: `auto` as given
    assert (
        json.loads((checkpoint / "blockllm_checkpoint.json").read_text())["settings"]["blockllm_include_embeddings"]
        == "auto"
    )
    for value in (True, False, "auto"):  # an old record of `auto`: not compared at parse time
        given = SimpleNamespace(**{**settings, "blockllm_include_embeddings": value})
        check_resume_checkpoint(args, None, given)
        assert given.blockllm_include_embeddings == value


@pytest.mark.parametrize("saved_with", [True, False])
def test_a_state_dict_of_the_other_include_embeddings_is_refused_naming_it(saved_with):
    """The blocks differ by the embedding and the head alone: the message says which side trains them and the value
    that resumes; other block differences keep the generic message."""
    saved = BlockLLM(_tiny_named_params(), include_embeddings=saved_with).state_dict()
    with pytest.raises(ValueError) as error:
        BlockLLM(_tiny_named_params(), include_embeddings=not saved_with).load_state_dict(saved)
    where = "among its blocks" if saved_with else "frozen"
    assert f"saved with the embeddings and the head {where} (embed_tokens.weight, lm_head.weight)" in str(error.value)
    assert f"set include_embeddings={saved_with} " in str(error.value)
    with pytest.raises(ValueError, match="saved for other blocks or another sparsity"):
        BlockLLM(_tiny_named_params(), include_embeddings=not saved_with, block_size=4).load_state_dict(saved)


def _trained_state() -> dict:
    """The state dict of a BlockLLM that has taken a few steps (moments exist)."""
    torch.manual_seed(0)
    model = TinyLM(width=8, depth=1)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5)
    for tokens in make_batches(3, seed=1):
        lm_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer.state_dict()


def _load_nonfinite():
    state = _trained_state()
    moments = next(entry for entry in state["state"].values() if "exp_avg" in entry)
    moments["exp_avg"][0] = float("nan")
    BlockLLM(_tiny_named_params(), sparsity=0.5).load_state_dict(state)


def _load_transposed():
    weight = torch.nn.Parameter(torch.zeros(4, 6))
    saved = BlockLLM([("weight", weight)], sparsity=0.5).state_dict()
    BlockLLM([("weight", torch.nn.Parameter(torch.zeros(6, 4)))], sparsity=0.5).load_state_dict(saved)


def _zero_state_dict_from(optimizer_class, **changes):
    from blockllm_factory.optim.zero import ZeroBlockLLM

    state = optimizer_class(_tiny_named_params()).state_dict()
    if "blockllm_zero" in state:
        state["blockllm_zero"].update(changes)
    ZeroBlockLLM(_tiny_named_params()).load_state_dict(state)


def _fsdp_state_dict_from(optimizer_class, **changes):
    from blockllm_factory.optim.fsdp import FSDP_STATE_KEY, FsdpBlockLLM

    state = optimizer_class(_tiny_named_params()).state_dict()
    if FSDP_STATE_KEY in state:
        state[FSDP_STATE_KEY].update(changes)
    FsdpBlockLLM(_tiny_named_params()).load_state_dict(state)


def _fsdp_step_unsharded():
    from blockllm_factory.optim.fsdp import FsdpBlockLLM

    model = TinyLM()
    optimizer = FsdpBlockLLM(model.named_parameters(), sparsity=0.9)
    lm_loss(model, torch.randint(0, 64, (2, 6))).backward()
    optimizer.step()


def _flipped_archive() -> bytes:
    """A torch.save archive that still reads, with other bytes than the one the checksum was taken of."""
    buffer = io.BytesIO()
    torch.save({"saved": torch.arange(4.0) + 1}, buffer)
    return buffer.getvalue()


def _load_into_other(mutate):
    first = BlockLLM(_tiny_named_params())
    state = first.state_dict()
    mutate(state)
    BlockLLM(_tiny_named_params()).load_state_dict(state)


def _half_patched(monkeypatch):
    from blockllm_factory import _import_hook
    from blockllm_factory.patches.arguments import check_blockllm_combination

    monkeypatch.setitem(_import_hook.failures, "llamafactory.model.adapter", "AttributeError: init_adapter")
    check_blockllm_combination(object(), {})


def _fake_zero3_param(sub_group):
    from blockllm_factory.optim.zero import find_fragment

    optimizer = SimpleNamespace(grad_position={7: [sub_group, 0, 4]}, get_param_id=lambda param: 7)
    param = SimpleNamespace(_z3_optimizer=optimizer, ds_numel=8)
    find_fragment(param)


def _not_blockllm_trainer():
    from blockllm_factory.patches.trainer import attach

    trainer = SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    attach(trainer, logger=None)


def _patience_share_without_run_length():
    from blockllm_factory.hf.optimizer import resolve_steps

    # The factory called outside a Trainer (which tells it the run's steps), on a run given in epochs.
    resolve_steps("patience", 0.1, SimpleNamespace(max_steps=-1), logger=None)


_ZERO2 = {"zero_optimization": {"stage": 2}}  # a DeepSpeed config as a dict: the engine decision reads its stage


def _cases(assets, tmp_path, monkeypatch):
    from blockllm_factory.hf.deepspeed_config import leave_clipping_to_blockllm
    from blockllm_factory.optim.fsdp import FsdpBlockLLM
    from blockllm_factory.optim.zero import ZeroBlockLLM
    from blockllm_factory.patches._version import check_llamafactory_version
    from blockllm_factory.patches.engine_setup import check_distributed_setup
    from blockllm_factory.patches.parser import check_training_setup

    def parse(**extra):
        return lambda: parse_args(assets, tmp_path / "parsed", **extra)

    cases = {
        "blockllm_sparsity": parse(blockllm_sparsity=1.5),
        "blockllm_patience": parse(blockllm_patience=0),
        "blockllm_probe": parse(blockllm_probe="all"),
        "blockllm_probe_blocks": parse(blockllm_probe_blocks=-1),
        "blockllm_include_embeddings": parse(blockllm_include_embeddings="maybe"),
        "blockllm_score": parse(blockllm_score="size"),
        "blockllm_block_size": parse(blockllm_block_size=-1),
        "blockllm_norms": parse(blockllm_norms="train"),
        "blockllm_coverage": parse(blockllm_coverage=0.5),
        "blockllm_reselect_warmup": parse(blockllm_reselect_warmup=-1),
        "blockllm_reselect_until": parse(blockllm_reselect_until=-1),
        "blockllm_master": parse(blockllm_master="fp16"),
        "blockllm_keep": parse(blockllm_keep="top"),
        "deepspeed_master": lambda: check_distributed_setup(
            None,
            SimpleNamespace(blockllm_block_size=0, blockllm_master="compensated"),
            SimpleNamespace(deepspeed=_ZERO2, resume_from_checkpoint=None, do_train=False, output_dir="", fsdp=""),
        ),
        "blockllm_patience_share_unknown_length": _patience_share_without_run_length,
        "deepspeed_block_size": lambda: check_distributed_setup(
            None,
            SimpleNamespace(blockllm_block_size=64),
            SimpleNamespace(deepspeed=_ZERO2, resume_from_checkpoint=None, do_train=False, output_dir="", fsdp=""),
        ),
        "stage": parse(stage="ppo"),
        "adapter_only_argument": parse(lora_rank=16),
        "fsdp": parse(fsdp="full_shard"),
        "optim": parse(optim="sgd"),
        "half_patched": lambda: _half_patched(monkeypatch),
        "version": lambda: check_llamafactory_version("0.9.4"),
        "use_mca": lambda: check_training_setup(None, SimpleNamespace(use_mca=True), None),
        "ddp_find_unused_parameters": lambda: check_distributed_setup(*_ddp_args(ddp_find_unused_parameters=False)),
        "ddp_static_graph": lambda: check_distributed_setup(*_ddp_args(ddp_static_graph=True)),
        "zero_stage": lambda: _ds({"zero_optimization": {"stage": 0}}),
        "zero_offload": lambda: _ds({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}),
        "zero_elastic_checkpoint": lambda: _ds({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}),
        "deepspeed_optimizer": lambda: _ds({"optimizer": {"type": "AdamW"}}),
        "zero_allow_untested_optimizer": lambda: _ds({"zero_allow_untested_optimizer": False}),
        "gradient_clipping": lambda: leave_clipping_to_blockllm(
            SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config={"gradient_clipping": 0.5}), max_grad_norm=1.0)
        ),
        "zero3_sub_group_size": lambda: _fake_zero3_param(sub_group=1),
        "resume_incomplete": lambda: (
            _checkpoints(tmp_path, [(2, True), (4, False)]),
            _resume(tmp_path, str(tmp_path / "checkpoint-4")),
        ),
        "output_dir_only_incomplete": lambda: (_checkpoints(tmp_path, [(4, False)]), _resume(tmp_path, None)),
        "resume_without_optimizer_state": lambda: _resume_saved(tmp_path, without=("optimizer.pt",), record=False),
        "resume_empty_file": lambda: _resume_saved(tmp_path, **{"optimizer.pt": b""}),
        "resume_truncated_file": lambda: _resume_saved(tmp_path, **{"optimizer.pt": b"partial"}),
        "resume_checksum": lambda: _resume_saved(tmp_path, **{"optimizer.pt": _flipped_archive()}),
        "resume_changed_setting": lambda: _resume_saved(
            tmp_path, SimpleNamespace(**{**BLOCK_SETTINGS, "blockllm_block_size": 64})
        ),
        "blockllm_patience_too_large": parse(blockllm_patience=2**63),
        "blockllm_unused": parse(finetuning_type="lora", blockllm_sparsity=0.5),
        "learning_rate": parse(learning_rate=-1.0),
        "adam_beta1": parse(adam_beta1=1.0),
        "state_dict_other_shapes": _load_transposed,
        "state_dict_missing_key": lambda: _load_into_other(lambda state: state["blockllm"].pop("visits")),
        "state_dict_nonfinite": _load_nonfinite,
        "zero_outside_deepspeed": lambda: ZeroBlockLLM(_tiny_named_params()).step(),
        "zero_max_grad_norm": lambda: ZeroBlockLLM(_tiny_named_params(), max_grad_norm=-1.0),
        "zero_compact_gradients": lambda: ZeroBlockLLM(_tiny_named_params(), compact_gradients=True),
        "zero_block_size": lambda: ZeroBlockLLM(_tiny_named_params(), block_size=64),
        "zero_master": lambda: ZeroBlockLLM(_tiny_named_params(), master="compensated"),
        "optimizer_score": lambda: BlockLLM(_tiny_named_params(), score="size"),
        "optimizer_block_size": lambda: BlockLLM(_tiny_named_params(), block_size=-1),
        "optimizer_norms": lambda: BlockLLM(_tiny_named_params(), norms="train"),
        "optimizer_master": lambda: BlockLLM(_tiny_named_params(), master="bf16"),
        "optimizer_optim_bits": lambda: BlockLLM(_tiny_named_params(), optim_bits=16),
        "optimizer_compact_gradients": lambda: BlockLLM(_tiny_named_params(), compact_gradients="yes"),
        "zero_state_world_size": lambda: _zero_state_dict_from(ZeroBlockLLM, world_size=4),
        "zero_state_not_zero": lambda: _zero_state_dict_from(BlockLLM),
        "fsdp2_compact_gradients": lambda: FsdpBlockLLM(_tiny_named_params(), compact_gradients=True),
        "fsdp2_block_size": lambda: FsdpBlockLLM(_tiny_named_params(), block_size=64),
        "fsdp2_optim_bits": lambda: FsdpBlockLLM(_tiny_named_params(), optim_bits=8),
        "fsdp2_master": lambda: FsdpBlockLLM(_tiny_named_params(), master="compensated"),
        "fsdp2_unsharded": _fsdp_step_unsharded,
        "fsdp2_state_rank": lambda: _fsdp_state_dict_from(FsdpBlockLLM, rank=1, world_size=2),
        "fsdp2_state_not_fsdp": lambda: _fsdp_state_dict_from(BlockLLM),
        "trainer_optimizer": _not_blockllm_trainer,
        "optimizer_lr": lambda: BlockLLM(_tiny_named_params(), lr=-1.0),
        "optimizer_betas": lambda: BlockLLM(_tiny_named_params(), betas=(1.0, 0.999)),
        "optimizer_eps": lambda: BlockLLM(_tiny_named_params(), eps=-1.0),
        "optimizer_weight_decay": lambda: BlockLLM(_tiny_named_params(), weight_decay=-0.1),
        "optimizer_sparsity": lambda: BlockLLM(_tiny_named_params(), sparsity=1.0),
        "optimizer_patience": lambda: BlockLLM(_tiny_named_params(), patience=0),
        "optimizer_probe": lambda: BlockLLM(_tiny_named_params(), probe="all"),
        "optimizer_probe_blocks": lambda: BlockLLM(_tiny_named_params(), probe_blocks=-1),
        "optimizer_include_embeddings": lambda: BlockLLM(_tiny_named_params(), include_embeddings="yes"),
        "optimizer_empty": lambda: BlockLLM([]),
        "optimizer_not_named": lambda: BlockLLM([param for _, param in _tiny_named_params()]),
        "optimizer_duplicate_name": lambda: BlockLLM(_tiny_named_params()[:1] * 2),
        "optimizer_nothing_eligible": lambda: BlockLLM(
            [(name, param) for name, param in _tiny_named_params() if "embed" in name or "lm_head" in name]
        ),
        "state_dict_not_blockllm": lambda: BlockLLM(_tiny_named_params()).load_state_dict({"state": {}}),
        "state_dict_other_blocks": lambda: BlockLLM(_tiny_named_params(), sparsity=0.5).load_state_dict(
            BlockLLM(_tiny_named_params()).state_dict()
        ),
        "state_dict_embeddings": lambda: BlockLLM(_tiny_named_params(), include_embeddings=True).load_state_dict(
            BlockLLM(_tiny_named_params()).state_dict()
        ),
        "state_dict_group_count": lambda: _load_into_other(lambda state: state["param_groups"].append({})),
        "state_dict_group_size": lambda: _load_into_other(lambda state: state["param_groups"][0]["params"].pop()),
    }
    for flag in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon", "use_llama_pro"):
        cases[f"exclusive_flag:{flag}"] = parse(**{flag: True})
    cases["exclusive_flag:use_hyper_parallel"] = lambda: __import__(
        "blockllm_factory.patches.arguments", fromlist=["check_blockllm_combination"]
    ).check_blockllm_combination(_exclusive_namespace("use_hyper_parallel"), {})
    from test_hardening import documented_triggers  # launch, surfaces and silent defaults (issue 11)

    cases.update(documented_triggers(assets, tmp_path, monkeypatch, parse))
    from test_hf import documented_triggers as trainer_front_triggers  # the Trainer front (blockllm_factory.hf)

    cases.update(trainer_front_triggers(assets))
    return cases


def _exclusive_namespace(flag):
    from blockllm_factory.patches.arguments import EXCLUSIVE_FLAGS

    return SimpleNamespace(stage="sft", **{name: name == flag for name in EXCLUSIVE_FLAGS})


def test_every_documented_refusal_has_a_test_and_every_tested_refusal_is_documented(tmp_path, monkeypatch):
    documented = bad_inputs("case")  # case id -> the documented ``ExceptionType: message``
    tested = _cases(None, tmp_path, monkeypatch)
    flags = {case.split(":", 1)[1] for case in tested if case.startswith("exclusive_flag:")}
    documented_ids = {case for case in documented if not case.startswith("exclusive_flag")}
    assert documented_ids | {f"exclusive_flag:{flag}" for flag in flags} == set(tested)
    from blockllm_factory.patches.arguments import EXCLUSIVE_FLAGS

    assert flags == set(EXCLUSIVE_FLAGS)


@pytest.mark.parametrize("case", sorted(_cases(None, Path("unused"), None)))
def test_refused_input_raises_the_documented_error(case, tiny_llamafactory_assets, tmp_path, monkeypatch):
    trigger = _cases(tiny_llamafactory_assets, tmp_path, monkeypatch)[case]
    documented = bad_inputs("case")["exclusive_flag" if case.startswith("exclusive_flag") else case]
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is part of the documented line
        trigger()
    actual = f"{type(raised.value).__name__}: {raised.value}"
    assert documented_pattern(documented).fullmatch(actual), f"documented:\n{documented}\nactual:\n{actual}"


@pytest.mark.parametrize(
    ("dtype", "master", "expected"),
    [
        (torch.float32, "fp32", "BlockLLM: trainable weights are torch.float32; no fp32 master copies are needed."),
        (torch.bfloat16, "fp32", "BlockLLM: trainable weights stay in half precision (torch.bfloat16); fp32 masters"),
        (
            torch.bfloat16,
            "compensated",
            "BlockLLM: trainable weights stay in half precision (torch.bfloat16); compensation buffers in the "
            "weights' dtype (`blockllm_master: compensated`) exist instead of fp32 masters",
        ),
    ],
)
def test_the_precision_line_says_what_the_trainable_weights_are(dtype, master, expected):
    """Before, `bf16: true` logged "stay in half precision" from the settings alone, also for weights LLaMA-Factory
    left in fp32 (a checkpoint stored in fp32, fp16 on a CPU). Now the line reads the model as set up."""
    from blockllm_factory.patches.adapter import build_init_adapter

    lines = []
    logger = SimpleNamespace(info_rank0=lines.append)
    model = TinyLM(width=8, depth=1, dtype=dtype)
    init_adapter = build_init_adapter(lambda config, model, *args: model, logger)
    finetuning_args = SimpleNamespace(
        finetuning_type="blockllm", use_badam=False, pure_bf16=False, blockllm_master=master
    )
    init_adapter(None, model, SimpleNamespace(compute_dtype=torch.bfloat16), finetuning_args, True)
    assert lines[-1].startswith(expected), lines


@pytest.mark.parametrize("content", ["", '{"global_step": 4, "log_hi'], ids=["empty", "half-written"])
def test_an_empty_or_half_written_trainer_state_counts_as_incomplete(content, tmp_path):
    """Before, automatic resume picked such a checkpoint and failed with a JSONDecodeError naming no file."""
    previous = _saved_checkpoint(tmp_path / "checkpoint-2")
    broken = _saved_checkpoint(tmp_path / "checkpoint-4")
    (broken / "trainer_state.json").write_text(content)
    warnings = []
    _, _, args = _ddp_args(output_dir=str(tmp_path), overwrite_output_dir=False)
    from blockllm_factory.patches.checkpoints import check_resume_checkpoint

    check_resume_checkpoint(args, SimpleNamespace(warning_rank0=warnings.append), None)
    assert args.resume_from_checkpoint == str(previous)
    assert warnings == [
        f"{broken} is incomplete (no complete trainer_state.json: its save was interrupted); resuming from "
        f"{previous} instead."
    ]

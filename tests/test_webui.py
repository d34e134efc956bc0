"""BlockLLM in the unmodified ``llamafactory-cli webui``, driven through Debian's Chromium with Playwright.

The server runs as users start it (``llamafactory-cli webui``, on loopback, on a free port) in a temporary working
directory, which is where LLaMA Board keeps its ``saves/``, ``llamaboard_config/`` and ``llamaboard_cache/``. The
browser test selects blockllm, sets the panel, checks the previewed command, a refusal, saving and loading a training
config, then trains the embedded tiny Llama for a few steps on CPU and waits for the finish message. A second browser
test checks that every DeepSpeed stage the UI offers gives the result of ``llamafactory-cli train``'s own argument
parsing, and trains once under ZeRO-3. The panel's screenshot goes to the test's temporary folder; with
``BLOCKLLM_FACTORY_UPDATE_SCREENSHOT=1`` it also replaces ``docs/images/webui_blockllm.png`` (the doc asset is never
rewritten otherwise).

The browser comes from ``scripts/ensure_browser.sh`` (run by ``scripts/test.sh``); without it the browser tests are
skipped with the reason, except under CI (``CI=true``), where a missing browser fails them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import CLI, ROOT, cli_env, parse_args, run_logged, tiny_config

from blockllm_factory.patches.webui import PANEL_INPUTS, panel_arguments, widget_spec
from blockllm_factory.patches.webui_locales import BLOCKLLM_LOCALES

SCREENSHOT = ROOT / "docs" / "images" / "webui_blockllm.png"
UPDATE_SCREENSHOT = "BLOCKLLM_FACTORY_UPDATE_SCREENSHOT"  # =1: the run refreshes the doc asset above
CHROMIUM = Path(os.environ.get("BLOCKLLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 240  # bound for the server to answer; it normally takes 20-40 s on 2 cores
TRAINING_S = 420  # bound for the few training steps to finish, model loading included
UI_S = 30  # bound for one UI reaction
TRAIN_STEPS = 6
# The panel's elements, one per YAML setting of the settings table, and their English labels.
PANEL_NAMES = ("blockllm_tab", "use_blockllm", *PANEL_INPUTS)
PANEL_LABELS = tuple(BLOCKLLM_LOCALES[name]["en"]["label"] for name in PANEL_NAMES[1:])


def test_panel_labels_exist_in_every_language_llamafactory_ships():
    from llamafactory.webui.locales import LOCALES

    languages = list(LOCALES["finetuning_type"])  # the languages of LLaMA-Factory's own labels
    assert {"en", "zh"} <= set(languages)
    for name in PANEL_NAMES:
        for language in languages:
            assert LOCALES[name][language]["label"].strip(), f"{name} has no {language} label"
        # Chinese written as Chinese, not the English text again.
        assert LOCALES[name]["zh"] != LOCALES[name]["en"]
        assert any("\u4e00" <= char <= "\u9fff" for char in json.dumps(LOCALES[name]["zh"], ensure_ascii=False))


def test_every_yaml_setting_has_a_panel_element_that_the_runner_reads():
    """The panel follows the settings table: one element per YAML setting, its kind from the setting, and the runner
    reads each back (probe_blocks only for the sampled probe)."""
    from blockllm_factory.optim.settings import YAML_SETTINGS

    kinds = {setting.name: widget_spec(setting)[0] for setting in YAML_SETTINGS}
    assert kinds["sparsity"] == "Slider" and kinds["probe"] == "Dropdown" and kinds["block_size"] == "Textbox"
    assert kinds["include_embeddings"] == "Dropdown"  # auto, true, false
    spec = {setting.name: widget_spec(setting)[1] for setting in YAML_SETTINGS}["include_embeddings"]
    assert spec == {"choices": ["auto", "true", "false"], "value": "auto"}
    values = {f"train.{setting.field}": widget_spec(setting)[1]["value"] for setting in YAML_SETTINGS}
    values["train.blockllm_probe_blocks"] = 3.0  # a gradio slider hands back a float
    arguments = panel_arguments(values.__getitem__)
    assert tuple(arguments) == PANEL_INPUTS
    assert arguments["blockllm_probe_blocks"] == 3 and arguments["blockllm_block_size"] == "head"
    values["train.blockllm_probe"] = "exact"
    assert "blockllm_probe_blocks" not in panel_arguments(values.__getitem__)


def test_finetuning_method_dropdown_offers_blockllm():
    from llamafactory.webui.components import top

    assert top.METHODS[-1] == "blockllm"
    from llamafactory.extras.constants import METHODS

    assert "blockllm" not in METHODS  # LLaMA-Factory's own list is left alone


# --- the browser test ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _no_browser(reason: str) -> None:
    """Skips with the reason on a developer's machine; under CI a test that cannot run is a failure."""
    if _under_ci():
        pytest.fail(f"CI=true and the web UI test cannot run: {reason}")
    print(f"SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _browser_or_skip():
    if not CHROMIUM.is_file():
        _no_browser(
            f"no Chromium at {CHROMIUM}; `bash scripts/ensure_browser.sh` installs it (root and apt-get needed)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _no_browser("the playwright Python package is missing (it is in the test extra: pip install playwright)")


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """``(url, workdir)`` of a ``llamafactory-cli webui`` on loopback; stopped, with its trainers, afterwards."""
    _browser_or_skip()
    workdir = tmp_path_factory.mktemp("webui")
    port = _free_port()
    # cli_env puts the virtual environment first on PATH: the runner starts `llamafactory-cli train` from there.
    env = cli_env(
        # DeepSpeed runs start torchrun with NPROC_PER_NODE processes, by default one per GPU: none on a CPU machine.
        NPROC_PER_NODE="1",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        BROWSER="true",  # launch(inbrowser=True) would open a desktop browser; `true` does nothing
        PYTHONUNBUFFERED="1",
    )
    log_path = workdir / "webui.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(CLI), "webui"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"llamafactory-cli webui exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llamafactory-cli webui did not answer within {SERVER_START_S} s:\n"
                            f"{log_path.read_text()[-4000:]}")  # fmt: skip
            time.sleep(1)
        yield url, workdir
    finally:
        # The server and the trainers it started share one process group (start_new_session above).
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def page(webui):
    from playwright.sync_api import sync_playwright

    url, _ = webui
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_S * 1000)
            page.goto(url)
            _in_english(page)
            page.get_by_label("Finetuning method", exact=True).wait_for()
            yield page
        finally:
            browser.close()


def _in_english(page) -> None:
    """LLaMA Board opens in the language last chosen on the server (its user config); these tests read English."""
    import re

    from llamafactory.webui.locales import LOCALES
    from playwright.sync_api import expect

    labels = [entry["label"] for entry in LOCALES["lang"].values()]
    language = page.get_by_label(re.compile("^(" + "|".join(map(re.escape, labels)) + ")$")).filter(visible=True)
    expect(language.first).to_have_value(re.compile("."))  # set when the page has loaded the saved language
    if language.first.input_value() != "en":
        language.first.click()
        page.get_by_role("option", name="en", exact=True).click()


def _field(page, label: str):
    """The visible dropdown or number box labelled ``label`` (other tabs hold fields with the same labels)."""
    return page.get_by_label(label, exact=True).filter(visible=True)


def _textbox(page, label: str):
    """The visible text box under the title ``label`` (its accessible name also holds the help text)."""
    title = page.get_by_text(label, exact=True)
    return page.locator("label").filter(visible=True).filter(has=title).locator("textarea")


def _choose(page, label: str, option: str) -> None:
    """Opens the dropdown and picks ``option``. A list can close again when its choices are refreshed while it opens
    (LLaMA Board reloads the dataset list on focus), so on a busy machine the click is repeated until it shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    choice = page.get_by_role("option", name=option, exact=True)
    deadline = time.monotonic() + UI_S
    while True:
        _field(page, label).click()
        try:
            choice.click(timeout=5000)
            break
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            # Close the list (open, it holds its options inside the label) and leave the field: it opens on focus.
            page.keyboard.press("Escape")
            _field(page, label).blur()
    page.keyboard.press("Escape")  # closes a multiselect's list; harmless otherwise


def _set_number(page, label: str, value) -> None:
    """Types into a slider's number box, as a user does, and leaves it so that gradio takes the value."""
    box = _field(page, f"number input for {label}")
    box.fill(str(value))
    box.press("Tab")


def _wait_text(page, text: str, timeout_s: float = UI_S):
    from playwright.sync_api import expect

    expect(page.get_by_text(text, exact=False).filter(visible=True).first).to_be_visible(timeout=timeout_s * 1000)


def _blockllm_on_demo_assets(page, assets) -> None:
    """Fills the form as both browser tests start: the demo's model as a custom one, blockllm, its data, fp32."""
    _choose(page, "Model name", "Custom")
    _textbox(page, "Model path").fill(str(assets.model_dir))
    _textbox(page, "Model path").press("Tab")
    _choose(page, "Finetuning method", "blockllm")
    _textbox(page, "Data dir").fill(str(assets.dataset_dir))
    _textbox(page, "Data dir").blur()  # not Tab: the next field, the dataset list, would open on focus
    _choose(page, "Dataset", "demo_sft")
    _choose(page, "Compute type", "fp32")


def test_blockllm_in_the_web_ui(page, webui, demo_assets, tmp_path):
    from playwright.sync_api import expect

    _, workdir = webui

    # --- choosing the method -------------------------------------------------------------------------------------
    lora_panel = page.get_by_text("LoRA configurations", exact=True)
    expect(lora_panel).to_be_visible()  # LLaMA-Factory's default method, lora, shows it
    _blockllm_on_demo_assets(page, demo_assets)

    panel = page.locator("#blockllm_panel")
    for label in PANEL_LABELS:
        expect(panel.get_by_text(label, exact=True)).to_be_visible()
    expect(_field(page, "number input for Sparsity")).to_have_value("0.95")
    expect(_textbox(page, "Patience")).to_have_value("100")
    expect(_field(page, "Probe")).to_have_value("sample")
    expect(_field(page, "number input for Probe blocks")).to_have_value("2")
    expect(_field(page, "Ranking score")).to_have_value("norm_per_sqrt_size")
    expect(_textbox(page, "Block size")).to_have_value("head")
    expect(_field(page, "Norms")).to_have_value("select")
    expect(_field(page, "Masters")).to_have_value("fp32")
    expect(_field(page, "Coordinates per block")).to_have_value("fraction")
    expect(panel.get_by_label("Use BlockLLM")).to_be_checked()
    # What does not apply is hidden or disabled.
    expect(lora_panel).to_be_hidden()
    expect(page.get_by_text("Freeze tuning configurations", exact=True)).to_be_hidden()
    expect(_field(page, "Quantization bit")).to_be_disabled()
    expect(page.get_by_label("Use BAdam")).to_be_disabled()

    # "Use BlockLLM" and the method dropdown follow each other.
    panel.get_by_label("Use BlockLLM").uncheck()
    expect(_field(page, "Finetuning method")).to_have_value("full")
    expect(lora_panel).to_be_visible()
    panel.get_by_label("Use BlockLLM").check()
    expect(_field(page, "Finetuning method")).to_have_value("blockllm")
    expect(lora_panel).to_be_hidden()

    # --- a short run on the embedded tiny Llama ------------------------------------------------------------------
    _textbox(page, "Learning rate").fill("3e-3")
    _textbox(page, "Max samples").fill("64")
    _set_number(page, "Cutoff length", 64)
    _set_number(page, "Batch size", 4)
    _set_number(page, "Gradient accumulation", 1)
    page.get_by_text("Extra configurations", exact=True).click()
    _set_number(page, "Logging steps", 1)
    extra = {"optim": "adamw_torch", "max_steps": TRAIN_STEPS, "use_cpu": True, "save_strategy": "no",
             "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": 0}  # fmt: skip
    _textbox(page, "Extra arguments").fill(json.dumps(extra))
    _set_number(page, "Sparsity", 0.9)
    _textbox(page, "Patience").fill("0.5")  # a share of the run: 3 of its 6 steps
    _textbox(page, "Block size").fill("4096")
    _choose(page, "Norms", "always")

    page.get_by_role("button", name="Preview command").click()
    command = page.locator("code").filter(has_text="llamafactory-cli train").filter(visible=True)
    expect(command).to_contain_text("--finetuning_type blockllm")
    text = command.inner_text()
    for expected in ("--blockllm_sparsity 0.9 ", "--blockllm_patience 0.5 ", "--blockllm_probe sample ",
                     "--blockllm_probe_blocks 2 ", "--blockllm_score norm_per_sqrt_size ",
                     "--blockllm_block_size 4096", "--blockllm_norms always"):  # fmt: skip
        assert expected in text, text
    assert "--lora_rank" not in text and "--quantization_bit" not in text, text
    assert "--blockllm_include_embeddings auto" in text  # the dropdown's default, passed as text

    # --- a refusal, with the parse-time message ------------------------------------------------------------------
    _textbox(page, "Extra arguments").fill(json.dumps({**extra, "lora_rank": 16}))
    page.get_by_role("button", name="Preview command").click()
    message = _parse_time_refusal(demo_assets, tmp_path, lora_rank=16)
    _wait_text(page, message)
    expect(command).to_have_count(0)  # the message took the command's place
    _textbox(page, "Extra arguments").fill(json.dumps(extra))

    # --- save and load a training config -------------------------------------------------------------------------
    page.get_by_role("button", name="Save arguments").click()
    _wait_text(page, "Arguments have been saved at:")
    (config_file,) = (workdir / "llamaboard_config").glob("*.yaml")
    saved = yaml.safe_load(config_file.read_text())
    assert saved["top.finetuning_type"] == "blockllm"
    assert saved["train.blockllm_sparsity"] == pytest.approx(0.9)
    assert str(saved["train.blockllm_patience"]) == "0.5" and saved["train.blockllm_norms"] == "always"
    assert str(saved["train.blockllm_block_size"]) == "4096" and saved["train.blockllm_score"] == "norm_per_sqrt_size"
    _set_number(page, "Sparsity", 0.5)
    expect(_field(page, "number input for Sparsity")).to_have_value("0.5")
    page.get_by_role("button", name="Load arguments").click()
    _wait_text(page, "Arguments have been restored.")
    expect(_field(page, "number input for Sparsity")).to_have_value("0.9")

    screenshot = tmp_path / SCREENSHOT.name
    page.add_style_tag(content=".toast-wrap { display: none !important; }")  # no notice over the panel in the picture
    panel.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 0
    if os.environ.get(UPDATE_SCREENSHOT) == "1":  # an explicit request: the checkout is never written otherwise
        shutil.copyfile(screenshot, SCREENSHOT)

    # --- Start ---------------------------------------------------------------------------------------------------
    page.get_by_role("button", name="Start").click()
    finished = page.get_by_text("Finished.", exact=False).filter(visible=True).first
    failed = page.get_by_text("Failed.", exact=False).filter(visible=True).first
    crashed = page.get_by_text("Error", exact=True).filter(visible=True).first  # gradio's badge for an exception
    expect(finished.or_(failed).or_(crashed)).to_be_visible(timeout=TRAINING_S * 1000)
    assert finished.is_visible(), page.locator(".prose").filter(visible=True).all_inner_texts()
    log_box = page.locator(".prose").filter(has_text="Finished.").filter(visible=True).first
    # The run log shown in the UI says which optimizer trained, with the panel's values.
    expect(log_box).to_contain_text(f"of {TRAIN_STEPS} optimizer steps is 3 steps")
    expect(log_box).to_contain_text("Using BlockLLM optimizer: sparsity 0.9, patience 3")
    expect(log_box).to_contain_text("norms always")
    # The loss plot was drawn from the trainer's log, as for any other method.
    expect(page.locator('[data-testid="matplotlib"] img').filter(visible=True)).to_be_visible()

    (run_dir,) = (workdir / "saves" / "Custom" / "blockllm").iterdir()
    train_args = yaml.safe_load((run_dir / "training_args.yaml").read_text())
    assert train_args["finetuning_type"] == "blockllm"
    assert train_args["blockllm_sparsity"] == pytest.approx(0.9)
    steps = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert [entry["current_steps"] for entry in steps if "loss" in entry] == list(range(1, TRAIN_STEPS + 1))

    # --- the panel in Chinese ------------------------------------------------------------------------------------
    _choose(page, "Language", "zh")
    expect(panel.get_by_text("BlockLLM 参数设置", exact=True)).to_be_visible()
    expect(panel.get_by_text("稀疏度", exact=True)).to_be_visible()


def _parse_time_refusal(assets, tmp_path: Path, **extra) -> str:
    """The message ``llamafactory-cli train`` refuses the run with, from LLaMA-Factory's own argument parsing."""
    with pytest.raises(ValueError) as refused:
        parse_args(assets, tmp_path / "refused", dataset="demo_sft", **extra)
    return str(refused.value)


# --- DeepSpeed stages: what the UI shows is what llamafactory-cli train decides -----------------------------------
DS_CHOICES = (("none", False), ("2", False), ("2", True), ("3", False), ("3", True))
# Parse-time outcome of `llamafactory-cli train` for each config: the torchrun child it starts (one process) runs
# LLaMA-Factory's get_train_args, here with the same environment torchrun gives it.
CLI_OUTCOMES = """
import json, os, sys

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2])
from llamafactory.hparams import get_train_args

outcomes = {}
for name, config in json.loads(sys.argv[1]).items():
    try:
        get_train_args(config)
        outcomes[name] = ""
    except (ValueError, RuntimeError) as error:
        outcomes[name] = str(error)
print(json.dumps(outcomes))
"""


def _ds_file(stage: str, offload: bool) -> str | None:
    # The configs the web UI writes at start-up (llamafactory.webui.common.create_ds_config), relative to its folder.
    return None if stage == "none" else f"llamaboard_cache/ds_z{stage}_{'offload_' if offload else ''}config.json"


def _cli_outcomes(assets, workdir: Path, extra: dict) -> dict[str, str]:
    base = tiny_config(assets, workdir / "cli_check", dataset="demo_sft", **extra)
    configs = {f"{stage}/{offload}": {**base, "deepspeed": _ds_file(stage, offload)} for stage, offload in DS_CHOICES}
    for config in configs.values():
        if config["deepspeed"] is None:
            del config["deepspeed"]
    # The web UI's own runs get the same environment (see the webui fixture).
    argv = [sys.executable, "-c", CLI_OUTCOMES, json.dumps(configs), str(_free_port())]
    result = run_logged(argv, workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_deepspeed_stage_shows_what_the_cli_decides(page, webui, demo_assets):
    from playwright.sync_api import expect

    _, workdir = webui
    _blockllm_on_demo_assets(page, demo_assets)
    extra = {"optim": "adamw_torch", "max_steps": 3, "use_cpu": True, "save_strategy": "no", "seed": 0,
             "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "cutoff_len": 64, "max_samples": 32,
             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1,
             "learning_rate": 3e-3}  # fmt: skip
    page.get_by_text("Extra configurations", exact=True).click()
    _textbox(page, "Extra arguments").fill(json.dumps(extra))
    output_dir = _field(page, "Output dir")
    output_dir.fill("deepspeed_z3")
    output_dir.press("Enter")
    expected = _cli_outcomes(demo_assets, workdir, extra)
    assert expected["2/False"] == "" and expected["3/False"] == ""  # ZeRO-2/3 train BlockLLM
    assert "offload_optimizer.device: cpu" in expected["3/True"]  # offload is refused

    command = page.locator("code").filter(has_text="llamafactory-cli train").filter(visible=True)
    offload = page.get_by_label("Enable offload")
    for stage, offloaded in DS_CHOICES:
        _choose(page, "DeepSpeed stage", stage)
        offload.set_checked(offloaded)
        page.get_by_role("button", name="Preview command").click()
        message = expected[f"{stage}/{offloaded}"]
        if message:
            _wait_text(page, message)
            expect(command).to_have_count(0)
            continue
        expect(command).to_contain_text("--finetuning_type blockllm")
        if stage == "none":
            expect(command).not_to_contain_text("--deepspeed")
        else:
            expect(command).to_contain_text(f"--deepspeed {_ds_file(stage, offloaded)}")

    # Start under ZeRO-3 (one CPU process): the run trains BlockLLM inside DeepSpeed and the UI says so.
    _choose(page, "DeepSpeed stage", "3")
    offload.set_checked(False)
    page.get_by_role("button", name="Start").click()
    finished = page.get_by_text("Finished.", exact=False).filter(visible=True).first
    failed = page.get_by_text("Failed.", exact=False).filter(visible=True).first
    crashed = page.get_by_text("Error", exact=True).filter(visible=True).first
    expect(finished.or_(failed).or_(crashed)).to_be_visible(timeout=TRAINING_S * 1000)
    assert finished.is_visible(), page.locator(".prose").filter(visible=True).all_inner_texts()
    run_dir = workdir / "saves" / "Custom" / "blockllm" / "deepspeed_z3"
    train_args = yaml.safe_load((run_dir / "training_args.yaml").read_text())
    assert train_args["deepspeed"] == _ds_file("3", False)
    log = (run_dir / "running_log.txt").read_text()
    assert "Using BlockLLM optimizer" in log
    selections = [json.loads(line) for line in (run_dir / "blockllm_selection.jsonl").read_text().splitlines()]
    assert selections and selections[0]["reason"] == "initial"

"""Surfaces ``llamafactory.webui.components.{top,train}`` and ``llamafactory.webui.runner``: BlockLLM in the web UI.

* ``components.top``: the "Finetuning method" dropdown offers ``blockllm``.
* ``components.train``: a "BlockLLM configurations" accordion, shaped like the BAdam and GaLore ones and placed right
  after BAdam's. Its inputs join the train tab's inputs (the set ``Manager.get_base_elems`` starts the tab with), so
  "Preview command", "Save arguments", "Load arguments", "Start" and resuming see them as they see LLaMA-Factory's
  own. Choosing blockllm opens the panel, hides the LoRA and freeze panels, and switches off and disables GaLore,
  APOLLO, BAdam and LLaMA Pro (LLaMA-Factory itself disables quantization for non-adapter methods).
* ``runner``: ``_parse_train_args`` turns the panel into ``blockllm_*`` arguments; ``_initialize`` refuses what the
  parse-time checks would refuse, with their message, by running those very checks on the arguments the runner built
  (``FinetuningArguments.__post_init__`` from :mod:`.arguments`, :func:`.parser.check_training_setup`) on a view of
  the training arguments built without their set-up, which would start distributed state and DeepSpeed in the server.
"""

import dataclasses
import functools
import os
from types import SimpleNamespace
from typing import Any

from blockllm_factory.optim.settings import FINETUNING_TYPE, SETTINGS, YAML_SETTINGS

from ._version import check_llamafactory_version
from .parser import check_training_setup

# Panel elements whose values the runner reads (registered as ``train.<name>``, saved in training configs).
PANEL_INPUTS = tuple(setting.field for setting in YAML_SETTINGS)
# Train-tab checkboxes for methods that parse time refuses together with blockllm.
EXCLUSIVE_CHECKBOXES = ("use_galore", "use_apollo", "use_badam", "use_llama_pro")
# Panels of settings that blockllm never reads.
HIDDEN_PANELS = ("lora_tab", "freeze_tab")


# --- components.top ---------------------------------------------------------------------------------------------


def apply_top(module) -> None:
    # ``create_top`` reads the module global at call time; LLaMA-Factory's own METHODS list stays as it is.
    if FINETUNING_TYPE not in module.METHODS:
        module.METHODS = [*module.METHODS, FINETUNING_TYPE]


# --- components.train -------------------------------------------------------------------------------------------


# The numeric settings the panel shows as sliders: (minimum, maximum, step). A new numeric setting names its range here
# (widget_spec refuses one that does not); every other kind of widget follows from the settings table.
SLIDERS = {
    "sparsity": (0, 0.995, 0.005),
    "probe_blocks": (0, 64, 1),
    "reselect_warmup": (0, 100, 1),
}
# Settings the runner reads only when another setting has a value: probe_blocks serves the sampled probe only.
READ_ONLY_WITH = {"probe_blocks": ("probe", "sample")}
PANEL_ROW = 6  # elements per row of the accordion ("Use BlockLLM" first)


def widget_spec(setting) -> tuple[str, dict[str, Any]]:
    """The gradio component (its class name) and its arguments for one setting of the table, with LLaMA-Factory's
    default as its value: a dropdown of its choices, a checkbox for a flag, a text box where the YAML field also takes
    a named value (``head``) or a share of the run (``0.1``: the parse-time check, settings.check, reads the number
    typed), else a slider."""
    default = setting.yaml_default
    if setting.choices:
        return "Dropdown", {"choices": list(setting.choices), "value": default}
    if setting.type is bool and setting.named_values:  # `auto`, true or false
        return "Dropdown", {"choices": [*setting.named_values, "true", "false"], "value": str(default)}
    if setting.type is bool:
        return "Checkbox", {"value": default}
    if setting.named_values or setting.share_of_run:
        return "Textbox", {"value": str(default)}
    if setting.name not in SLIDERS:
        raise KeyError(f"the web UI panel has no slider range for the setting {setting.name!r}: add it to SLIDERS")
    minimum, maximum, step = SLIDERS[setting.name]
    return "Slider", {"minimum": minimum, "maximum": maximum, "value": default, "step": step}


def create_blockllm_panel() -> dict[str, Any]:
    """The accordion and its elements, one per YAML setting (in the table's order), unlabelled: labels come from
    LOCALES (see :mod:`.webui_locales`)."""
    import gradio as gr

    panel: dict[str, Any] = {}
    with gr.Accordion(open=False, elem_id="blockllm_panel") as blockllm_tab:
        names = ["use_blockllm", *PANEL_INPUTS]
        for first in range(0, len(names), PANEL_ROW):
            with gr.Row():
                for name in names[first : first + PANEL_ROW]:
                    if name == "use_blockllm":
                        panel[name] = gr.Checkbox()
                        continue
                    kind, arguments = widget_spec(SETTINGS[name.removeprefix(f"{FINETUNING_TYPE}_")])
                    panel[name] = getattr(gr, kind)(**arguments)
    return {"blockllm_tab": blockllm_tab, **panel}


def _place_after(block, anchor) -> None:
    """Moves ``block`` right after ``anchor`` in their common layout parent (gradio lays children out in order)."""
    parent = anchor.parent
    if parent is None or block.parent is not parent:
        return
    parent.children.remove(block)
    parent.children.insert(parent.children.index(anchor) + 1, block)


def follow_method(finetuning_type: str) -> tuple:
    """Outputs: use_blockllm, blockllm_tab, *HIDDEN_PANELS, *EXCLUSIVE_CHECKBOXES."""
    import gradio as gr

    chosen = finetuning_type == FINETUNING_TYPE
    exclusive = gr.update(value=False, interactive=False) if chosen else gr.update(interactive=True)
    return (
        gr.update(value=chosen),
        gr.update(open=True) if chosen else gr.update(),
        *(gr.update(visible=not chosen) for _ in HIDDEN_PANELS),
        *(exclusive for _ in EXCLUSIVE_CHECKBOXES),
    )


def method_from_checkbox(use_blockllm: bool, finetuning_type: str) -> str:
    """Ticking "Use BlockLLM" selects blockllm; unticking it falls back to full tuning, its closest relative."""
    if use_blockllm:
        return FINETUNING_TYPE
    return "full" if finetuning_type == FINETUNING_TYPE else finetuning_type


def build_create_train_tab(original):
    @functools.wraps(original)
    def create_train_tab(engine):
        # Built before LLaMA-Factory's tab so that its inputs are in the set the tab's buttons are wired with.
        panel = create_blockllm_panel()
        panel_inputs = {panel[name] for name in PANEL_INPUTS}
        manager = engine.manager
        own_override = vars(manager).get("get_base_elems")
        get_base_elems = manager.get_base_elems
        manager.get_base_elems = lambda: get_base_elems() | panel_inputs
        try:
            elem_dict = original(engine)
        finally:  # only the train tab's inputs grow; the other tabs get LLaMA-Factory's set
            if own_override is None:
                del manager.get_base_elems
            else:
                manager.get_base_elems = own_override

        _place_after(panel["blockllm_tab"], elem_dict["badam_tab"])
        finetuning_type = manager.get_elem_by_id("top.finetuning_type")
        followers = [
            panel["use_blockllm"],
            panel["blockllm_tab"],
            *(elem_dict[name] for name in HIDDEN_PANELS),
            *(elem_dict[name] for name in EXCLUSIVE_CHECKBOXES),
        ]
        finetuning_type.change(follow_method, [finetuning_type], followers, queue=False)
        panel["use_blockllm"].input(
            method_from_checkbox, [panel["use_blockllm"], finetuning_type], [finetuning_type], queue=False
        )
        return {**elem_dict, **panel}

    return create_train_tab


def apply_train(module) -> None:
    module.create_train_tab = build_create_train_tab(module.create_train_tab)


# --- runner -----------------------------------------------------------------------------------------------------


def _whole(value):
    # Gradio sliders may hand back 100.0; a fractional value is left as it is, for the range check to refuse.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def panel_arguments(get) -> dict[str, Any]:
    """The ``blockllm_*`` arguments from the panel in the table's order; ``get(elem_id)`` reads one element's value."""
    arguments: dict[str, Any] = {}
    for setting in YAML_SETTINGS:
        condition = READ_ONLY_WITH.get(setting.name)
        if condition is not None and arguments.get(SETTINGS[condition[0]].field) != condition[1]:
            continue
        value = get(f"train.{setting.field}")
        kind, _ = widget_spec(setting)
        if kind == "Textbox":  # as typed: the parse-time check (settings.check) reads the number
            value = str(value).strip()
        elif kind == "Slider" and setting.type is int:
            value = _whole(value)
        arguments[setting.field] = value
    return arguments


def _insert_after(args: dict[str, Any], key: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``args`` with ``extra`` right after ``key`` (the previewed command reads in this order), ``extra`` winning."""
    merged = {}
    for name, value in args.items():
        if name not in extra:
            merged[name] = value
        if name == key:
            merged.update(extra)
    return merged


def launch_world_size(args: dict[str, Any]) -> int:
    """How many processes ``llamafactory-cli train`` (as the runner starts it) will launch: LLaMA-Factory's rule."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    torchrun = args.get("deepspeed") is not None or is_env_enabled("FORCE_TORCHRUN")
    if not torchrun and not (get_device_count() > 1 and not use_ray() and not use_kt()):
        return 1
    return max(1, int(os.getenv("NPROC_PER_NODE", str(get_device_count())))) * int(os.getenv("NNODES", "1"))


def field_view(dataclass_type, args: dict[str, Any], **extra: Any) -> SimpleNamespace:
    """The dataclass's field defaults overlaid with ``args``, built without running its ``__post_init__`` (which for
    the training arguments sets up devices and distributed state)."""
    values = {}
    for spec in dataclasses.fields(dataclass_type):
        if spec.default is not dataclasses.MISSING:
            values[spec.name] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            values[spec.name] = spec.default_factory()
        else:
            values[spec.name] = None
    values.update((name, value) for name, value in args.items() if name in values)
    values.update(extra)
    return SimpleNamespace(**values)


def deepspeed_view(args: dict[str, Any]) -> SimpleNamespace | None:
    """What the training arguments' ``hf_deepspeed_config`` would hold, read without setting DeepSpeed up: the config
    file with ``gradient_clipping: auto`` filled from ``max_grad_norm``, as transformers fills it."""
    import json

    path = args.get("deepspeed")
    if path is None:
        return None
    if isinstance(path, dict):
        config = dict(path)
    else:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = float(args.get("max_grad_norm", 1.0))
    return SimpleNamespace(config=config)


def refusal(args: dict[str, Any]) -> str:
    """The message parse time would refuse these training arguments with, or "" if it would accept them."""
    from llamafactory import hparams
    from llamafactory.hparams import finetuning_args as finetuning_module
    from transformers import HfArgumentParser

    try:
        # LLaMA-Factory's own parsing step for this dataclass: __post_init__ runs every blockllm check.
        (finetuning_args,) = HfArgumentParser(finetuning_module.FinetuningArguments).parse_dict(
            args, allow_extra_keys=True
        )
        model_args = field_view(hparams.ModelArguments, args)
        training_args = field_view(
            hparams.TrainingArguments,
            args,
            world_size=launch_world_size(args),
            hf_deepspeed_config=deepspeed_view(args),
        )
        check_training_setup(model_args, finetuning_args, training_args)
    except (ValueError, RuntimeError) as error:  # the refusals, as the CLI prints them after the type
        return str(error)
    except Exception as error:  # noqa: BLE001 - anything else the CLI would stop on: shown, never a crashed page
        return f"{type(error).__name__}: {error}"
    return ""


def build_parse_train_args(original):
    @functools.wraps(original)
    def _parse_train_args(self, data):
        args = original(self, data)
        if args.get("finetuning_type") != FINETUNING_TYPE:
            return args
        return _insert_after(
            args, "finetuning_type", panel_arguments(lambda elem_id: data[self.manager.get_elem_by_id(elem_id)])
        )

    return _parse_train_args


def build_initialize(original):
    @functools.wraps(original)
    def _initialize(self, data, do_train, from_preview):
        error = original(self, data, do_train, from_preview)
        if error or not do_train or data[self.manager.get_elem_by_id("top.finetuning_type")] != FINETUNING_TYPE:
            return error
        return refusal(self._parse_train_args(data))

    return _initialize


def apply_runner(module) -> None:
    runner = module.Runner
    parse_train_args = build_parse_train_args(runner._parse_train_args)
    initialize = build_initialize(runner._initialize)
    runner._parse_train_args = parse_train_args
    runner._initialize = initialize


SURFACES = {
    "llamafactory.webui.components.top": apply_top,
    "llamafactory.webui.components.train": apply_train,
    "llamafactory.webui.runner": apply_runner,
}


def apply(module) -> None:
    check_llamafactory_version()
    SURFACES[module.__name__](module)

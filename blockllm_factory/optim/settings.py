"""BlockLLM's settings, each defined once: name, defaults, allowed values, help text and the check of a value.

``BlockLLM(...)`` checks its arguments here; LLaMA-Factory's ``blockllm_*`` arguments (``patches/arguments.py``), the
web UI panel (``patches/webui.py``) and docs/bad_inputs.md are built from or checked against the same table, so a bad
value gets one message wherever it is given. The message names the field the user wrote: ``sparsity`` in the Python
API, ``blockllm_sparsity`` in YAML, on the command line and in the web UI. Pure Python: nothing here imports torch or
LLaMA-Factory.
"""

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, Literal

FINETUNING_TYPE = "blockllm"  # LLaMA-Factory's `finetuning_type` for BlockLLM, and the prefix of its fields
PROBES = ("sample", "exact")
SCORES = ("norm", "norm_per_sqrt_size")
OPTIM_BITS = (32, 8)
NORM_POLICIES = ("select", "always", "frozen")
MASTERS = ("fp32", "compensated")
KEEP_RULES = ("fraction", "threshold")
SHARE_OF_RUN = "a number in (0, 1) (that share of the run's optimizer steps)"
MAX_PATIENCE = 10**9  # steps; a run never gets there, and Python's deque refuses a window above 2**63 - 1
BLOCK_SIZE_HEAD = "head"  # `blockllm_block_size: head`, resolved from the model's config by patches/optimizer.py
COVERAGE_AUTO = "auto"  # `blockllm_coverage: auto`: COVERAGE_ROW_GROUPS with row-group blocks, 1 with whole tensors
COVERAGE_ROW_GROUPS = 4.0  # measured better with head blocks on the real model (docs/benchmarks.md, ninth round)
# `blockllm_include_embeddings: auto`: true where the embeddings' and head's gradients can be kept as rows (one
# process, row-group blocks, plain nn.Embedding / nn.Linear modules: optim/rows.py), else false (hf/optimizer.py)
EMBEDDINGS_AUTO = "auto"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _at_least(minimum: float) -> Callable[[Any], bool]:
    return lambda value: _is_real(value) and minimum <= value < float("inf")  # NaN and infinity are refused


def _integer_at_least(minimum: int, maximum: int | None = None) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )


def _is_fraction(value: Any) -> bool:
    return _is_real(value) and 0.0 <= value < 1.0


def _is_share(value: Any) -> bool:
    return _is_real(value) and 0.0 < value < 1.0


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_pair_of_fractions(value: Any) -> bool:
    return isinstance(value, tuple | list) and len(value) == 2 and all(_is_fraction(beta) for beta in value)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One keyword of ``BlockLLM(...)``; a YAML field ``blockllm_<name>`` unless ``set_from`` names where
    LLaMA-Factory takes it from instead."""

    name: str
    type: type
    default: Any  # BlockLLM(...)'s default
    allowed: str  # the allowed values, as the error message says them
    accepts: Callable[[Any], bool]
    help: str
    choices: tuple = ()
    llamafactory_default: Any = None  # the default of the YAML field where it differs from `default`
    # Named values only the YAML field accepts, resolved by patches/optimizer.py before the optimizer sees them.
    named_values: dict[str, str] = dataclasses.field(default_factory=dict)
    set_from: str = ""  # not a YAML field: what LLaMA-Factory sets it from
    # The YAML field also takes a share of the run in (0, 1), turned into optimizer steps by patches/optimizer.py
    # (steps_from_share) once the run's length is known; the optimizer itself takes steps only.
    share_of_run: bool = False

    @property
    def field(self) -> str:
        """The name of the LLaMA-Factory argument, ``blockllm_<name>``."""
        return f"{FINETUNING_TYPE}_{self.name}"

    @property
    def yaml_default(self) -> Any:
        return self.default if self.llamafactory_default is None else self.llamafactory_default

    def yaml_only(self) -> list[str]:
        """What the YAML field accepts beyond ``BlockLLM(...)``'s values, as the error message says it."""
        named = [f"`{value}` ({meaning})" for value, meaning in self.named_values.items()]
        return named + ([SHARE_OF_RUN] if self.share_of_run else [])

    def allowed_in(self, yaml: bool) -> str:
        extra = self.yaml_only() if yaml else []
        if not extra:
            return self.allowed
        # "..., an integer > 0 (...) or 0 (...)" already ends in its own "or"; else the last choice gets one.
        return ", ".join(extra) + (", " if " or " in self.allowed else " or ") + self.allowed


def _choice(name: str, choices: tuple, default: Any, help: str, **extra: Any) -> Setting:
    return Setting(
        name,
        type(default),
        default,
        f"one of {', '.join(map(str, choices))}",
        lambda value: value in choices and not isinstance(value, bool),
        help,
        choices=choices,
        **extra,
    )


_SETTINGS = (
    # torch's own AdamW settings, set by LLaMA-Factory from its training arguments.
    Setting("lr", float, 1e-3, "a number >= 0", _at_least(0.0), "Learning rate.", set_from="learning_rate"),
    Setting(
        "betas",
        tuple,
        (0.9, 0.999),
        "two numbers, each in [0, 1)",
        _is_pair_of_fractions,
        "Adam's coefficients of the running averages of the gradient and its square.",
        set_from="adam_beta1, adam_beta2",
    ),
    Setting("eps", float, 1e-8, "a number >= 0", _at_least(0.0), "Adam's epsilon.", set_from="adam_epsilon"),
    Setting(
        "weight_decay",
        float,
        0.0,
        "a number >= 0",
        _at_least(0.0),
        "Decoupled weight decay of the selected coordinates.",
        set_from="weight_decay",
    ),
    Setting(
        "seed",
        int,
        0,
        f"an integer from {-(2**63)} to {2**64 - 1}",
        _integer_at_least(-(2**63), 2**64 - 1),  # what torch.Generator.manual_seed takes
        "Seed of the optimizer's own random generator (the blocks the sampled probe measures); saved in checkpoints.",
        set_from="seed",
    ),
    # BlockLLM's own.
    Setting(
        "sparsity",
        float,
        0.95,
        "a number in [0, 1) (the share of coordinates left unchanged per step)",
        _is_fraction,
        "Share of the trainable coordinates that BlockLLM leaves unchanged at each step, in [0, 1). "
        "0.95 (the paper's setting) updates about one coordinate in twenty at a time.",
    ),
    Setting(
        "patience",
        int,
        100,
        f"an integer from 1 to {MAX_PATIENCE:,} (optimizer steps)",
        _integer_at_least(1, MAX_PATIENCE),
        "Window m of BlockLLM's loss rule: the selected blocks are revisited when the loss is at or above the mean "
        "of the last m optimizer-step losses. An integer >= 1 is a number of optimizer steps; a number in (0, 1) is "
        "that share of the run's optimizer steps (e.g. 0.1 of a 1,000-step run: 100), resolved when the optimizer "
        "is created.",
        share_of_run=True,
    ),
    _choice(
        "probe",
        PROBES,
        "sample",
        "How BlockLLM measures gradient norms of unselected blocks: `sample` (the paper: a few random unselected "
        "blocks per step) or `exact` (every block, one gradient at a time, before a reselection).",
    ),
    Setting(
        "probe_blocks",
        int,
        2,
        "an integer >= 0",
        _integer_at_least(0),
        "Number of unselected blocks probed per step with `blockllm_probe: sample` (>= 0).",
    ),
    Setting(
        "include_embeddings",
        bool,
        False,
        "true or false",
        _is_bool,
        "Whether BlockLLM may also select the input embeddings and the output head, as row blocks (needed when "
        "training from scratch): `auto` (the default: true in one process with row-group blocks where their "
        "gradients can be kept as rows, optim/rows.py; false under DDP, DeepSpeed, with whole tensors and with "
        "embedding modules of other types, e.g. Gemma's scaled ones; measured better on a real model, "
        "docs/algorithm.md), true, or false (the paper's code).",
        llamafactory_default=EMBEDDINGS_AUTO,
        named_values={
            EMBEDDINGS_AUTO: "true in one process with row-group blocks and plain embedding modules, else false; "
            "the default"
        },
    ),
    Setting(
        "compact_gradients",
        bool,
        True,
        "true or false",
        _is_bool,
        "Keep only the masked coordinates of each selected block's gradient.",
        set_from="the engine (off under DDP and DeepSpeed)",
    ),
    _choice(
        "optim_bits",
        OPTIM_BITS,
        32,
        "Bits of the Adam moments: 32 (fp32) or 8 (block-wise 8-bit, bitsandbytes).",
        set_from="optim",
    ),
    _choice(
        "score",
        SCORES,
        "norm",
        "How BlockLLM ranks blocks: `norm_per_sqrt_size` (the default: gradient norm over visit frequency, divided "
        "by the square root of the block's size, which removes the bias toward large tensors; measured better, "
        "docs/algorithm.md) or `norm` (the paper's rule).",
        llamafactory_default="norm_per_sqrt_size",
    ),
    Setting(
        "block_size",
        int,
        0,
        "an integer > 0 (row groups of about that many coordinates) or 0 (whole tensors, the paper)",
        _integer_at_least(0),
        "Size of BlockLLM's blocks: `head` (the default: groups of whole rows of head_dim x hidden_size "
        "coordinates, one attention head of q/k/v, read from the model's config; whole tensors under DeepSpeed), "
        "an integer N > 0 (row groups of about N coordinates) or 0 (the paper: every weight tensor is one block). "
        "Finer blocks spread the budget over more layers. Numbers other than 0 are refused under DeepSpeed.",
        llamafactory_default=BLOCK_SIZE_HEAD,
        named_values={BLOCK_SIZE_HEAD: "one attention head: head_dim x hidden_size coordinates, the default"},
    ),
    _choice(
        "norms",
        NORM_POLICIES,
        "select",
        "What BlockLLM does with normalisation layers' weights (names with a `norm` component, e.g. "
        "input_layernorm): `select` (the default and the paper: ordinary blocks, ranked and selected like any other), "
        "`always` (in every selection, whole, inside the budget: the other blocks share what they leave) or `frozen` "
        "(never trained, like the embeddings without `blockllm_include_embeddings`).",
    ),
    Setting(
        "coverage",
        float,
        1.0,
        "a number >= 1 (blocks picked per budget)",
        _at_least(1.0),
        "How many budgets' worth of blocks a selection picks, in rank order: `auto` (the default: 4 with row-group "
        "blocks, `blockllm_block_size` head or N; 1 with whole tensors, block size 0 and under DeepSpeed), 1 (the "
        "paper: blocks until the budget is filled) or c > 1 (blocks until c budgets are filled, each keeping its top "
        "1/c coordinates by gradient magnitude: the same budget spread over c times as many blocks; measured better "
        "on a real 30-layer model with head blocks, docs/algorithm.md).",
        llamafactory_default=COVERAGE_AUTO,
        named_values={COVERAGE_AUTO: "4 with row-group blocks, 1 with whole tensors; the default"},
    ),
    Setting(
        "reselect_warmup",
        int,
        0,
        "an integer >= 0 (optimizer steps)",
        _integer_at_least(0),
        "Optimizer steps W over which a new selection's learning rate ramps up after a reselection: its k-th update "
        "uses k/W of the rate for k < W (its moments start from zero, so Adam's first steps are full-size steps in "
        "the gradient's sign). 0 (the default and the paper): none. The first selection is left to the run's own "
        "warm-up (`warmup_steps`).",
    ),
    Setting(
        "reselect_until",
        int,
        0,
        "an integer >= 0 (the last optimizer step that may reselect; 0: no limit)",
        _integer_at_least(0),
        "The last optimizer step at which the loss rule may revisit the selection; later the selection stays to the "
        "end of the run (a new selection late in a decaying schedule starts from zero moments at a rate too small to "
        "move it). An integer N >= 1 is a step; a number in (0, 1) is that share of the run's optimizer steps (0.75: "
        "no reselection in the last quarter). 0 (the default and the paper): no limit.",
        share_of_run=True,
    ),
    _choice(
        "master",
        MASTERS,
        "fp32",
        "How BlockLLM keeps the high-precision part of half-precision (bf16/fp16) weights for the selected "
        "coordinates: `fp32` (the default: an fp32 master copy, 4 bytes a coordinate) or `compensated` (a "
        "compensation buffer in the weights' own dtype, 2 bytes a coordinate, Kahan-style: the weight plus its "
        "compensation carries the bits a rounded weight loses). No effect on fp32 weights.",
    ),
    _choice(
        "keep",
        KEEP_RULES,
        "fraction",
        "How many coordinates each picked block keeps when the picked blocks hold more than the budget (coverage "
        "above 1, or the last block of a selection): `fraction` (the default and the paper's per-layer top-k: the "
        "same top fraction of every picked block) or `threshold` (as many as lie above one gradient-magnitude "
        "threshold over all picked blocks, estimated from each block's measured gradient norm: blocks with larger "
        "gradients keep more of the same budget; docs/algorithm.md).",
    ),
)

SETTINGS: dict[str, Setting] = {setting.name: setting for setting in _SETTINGS}
DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in _SETTINGS}  # BlockLLM(...)'s defaults
YAML_SETTINGS: tuple[Setting, ...] = tuple(setting for setting in _SETTINGS if not setting.set_from)


def invalid_value(field: str, allowed: str, value: Any) -> ValueError:
    """The error for a refused value, in the one wording every check uses."""
    return ValueError(f"`{field}` must be {allowed}, got {value!r}.")


def check(name: str, value: Any, *, yaml: bool = False) -> Any:
    """``value`` of the setting ``name`` if it is allowed, else a ``ValueError`` naming the field as the user wrote it:
    ``name`` for ``BlockLLM(...)``, ``blockllm_<name>`` (``yaml=True``) for LLaMA-Factory's arguments. A YAML field
    also takes the setting's named values and, where the setting says so, a share of the run in (0, 1) (returned as a
    float, for patches/optimizer.py to turn into steps); there, a number written as text (command line, web UI) is
    returned as a number.
    """
    setting = SETTINGS[name]
    if yaml and (setting.named_values or setting.share_of_run) and isinstance(value, str):
        if value in setting.named_values:
            return value
        if setting.type is bool:  # a flag with a named value, written as text (command line, web UI)
            value = _bool_from_text(value)
        else:
            value = _number_from_text(value, decimals=setting.share_of_run or setting.type is float)
    if yaml and setting.share_of_run and _is_share(value):
        return float(value)
    if not setting.accepts(value):
        raise invalid_value(setting.field if yaml else name, setting.allowed_in(yaml), value)
    return value


def _bool_from_text(text: str) -> Any:
    """The words transformers' argument parser reads as a boolean (``yes``/``no``, ``true``/``false``, ``t``/``f``,
    ``y``/``n``, ``1``/``0``, any case); anything else stays text, for the check to refuse."""
    word = text.strip().lower()
    if word in ("yes", "true", "t", "y", "1"):
        return True
    if word in ("no", "false", "f", "n", "0"):
        return False
    return text


def _number_from_text(text: str, decimals: bool) -> Any:
    """Digits as an int; with ``decimals`` (a share of the run, a coverage), also a decimal number as a float
    (``0.1`` typed in the web UI). Anything else stays text, for the check to refuse."""
    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    if decimals:
        try:
            return float(stripped)
        except ValueError:
            return text
    return text


def steps_from_share(share: float, total_steps: int) -> int:
    """A share of the run in (0, 1) as optimizer steps: ``share x total_steps`` rounded to the nearest step, at least
    1. LLaMA-Factory's ``blockllm_patience: 0.1`` goes through it; in Python, pass the result as ``patience``."""
    if not _is_share(share):
        raise invalid_value("share", SHARE_OF_RUN, share)
    if not (isinstance(total_steps, int) and not isinstance(total_steps, bool) and total_steps >= 1):
        raise invalid_value("total_steps", "an integer >= 1 (the run's optimizer steps)", total_steps)
    return min(MAX_PATIENCE, max(1, round(share * total_steps)))


def _field_type(setting: Setting):
    """The type a ``blockllm_<name>`` field is parsed as (``HfArgumentParser``): its choices (shown in ``--help``),
    text where the field also takes named values (``head``) or a share of the run (``0.1``; :func:`check` reads the
    number), else the optimizer's type."""
    if setting.choices:
        return Literal[setting.choices]
    return str if setting.named_values or setting.share_of_run else setting.type


# The ``blockllm_*`` fields, one per YAML setting, with their YAML defaults and help text: LLaMA-Factory's
# ``FinetuningArguments`` (patches/arguments.py) and the transformers front's ``BlockLLMConfig`` (blockllm_factory/hf)
# both derive from it, so both take the same fields and refuse a bad value with the same message (check_arguments).
BlockLLMArguments = dataclasses.make_dataclass(
    "BlockLLMArguments",
    [
        (
            setting.field,
            _field_type(setting),
            dataclasses.field(default=setting.yaml_default, metadata={"help": setting.help}),
        )
        for setting in YAML_SETTINGS
    ],
    namespace={
        "__doc__": "Arguments pertaining to BlockLLM (arXiv 2406.17296), one field ``blockllm_<name>`` per setting of "
        "blockllm_factory/optim/settings.py.",
        "__module__": __name__,
    },
)


def check_arguments(args) -> None:
    """Range checks of the ``blockllm_*`` fields of ``args``, in the wording of ``BlockLLM(...)``'s own checks, naming
    the field; a block size or patience written as text (command line, web UI) becomes a number."""
    for setting in YAML_SETTINGS:
        setattr(args, setting.field, check(setting.name, getattr(args, setting.field), yaml=True))

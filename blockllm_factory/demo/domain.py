"""Text of a domain the demo's base model has never seen, for continued pretraining (recipes/bench/quality_pt.yaml).

The tiny base model of :mod:`blockllm_factory.demo.assets` is pretrained on prose about words, numbers, capitals and
opposites. This module writes plain text about the chemical elements instead (symbols, atomic numbers, groups, states
at room temperature): facts and words that are nowhere in the base model's text, drawn from fixed tables with
``random.Random(seed)``, so two builds give the same bytes. Each record is a short paragraph of a few facts about a few
elements. The held-out set draws paragraphs with another seed from the same facts: its loss measures how much of the
domain a run has taken in.

Layout of the folder (``runs/demo/domain`` for the quality suite), used as ``dataset_dir``::

    dataset_info.json   domain_pt.json (training)   domain_pt_eval.json (held out)
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from blockllm_factory.demo import builder

SEED = 4321
TRAIN_PARAGRAPHS = 3000
EVAL_PARAGRAPHS = 300
FACTS_PER_PARAGRAPH = (3, 6)
DATASETS = {"domain_pt": TRAIN_PARAGRAPHS, "domain_pt_eval": EVAL_PARAGRAPHS}

# fmt: off
# name, symbol, atomic number, group, state at room temperature
ELEMENTS = (
    ("hydrogen", "H", 1, "nonmetal", "gas"), ("helium", "He", 2, "noble gas", "gas"),
    ("lithium", "Li", 3, "alkali metal", "solid"), ("beryllium", "Be", 4, "alkaline earth metal", "solid"),
    ("boron", "B", 5, "metalloid", "solid"), ("carbon", "C", 6, "nonmetal", "solid"),
    ("nitrogen", "N", 7, "nonmetal", "gas"), ("oxygen", "O", 8, "nonmetal", "gas"),
    ("fluorine", "F", 9, "halogen", "gas"), ("neon", "Ne", 10, "noble gas", "gas"),
    ("sodium", "Na", 11, "alkali metal", "solid"), ("magnesium", "Mg", 12, "alkaline earth metal", "solid"),
    ("aluminium", "Al", 13, "post-transition metal", "solid"), ("silicon", "Si", 14, "metalloid", "solid"),
    ("phosphorus", "P", 15, "nonmetal", "solid"), ("sulfur", "S", 16, "nonmetal", "solid"),
    ("chlorine", "Cl", 17, "halogen", "gas"), ("argon", "Ar", 18, "noble gas", "gas"),
    ("potassium", "K", 19, "alkali metal", "solid"), ("calcium", "Ca", 20, "alkaline earth metal", "solid"),
    ("titanium", "Ti", 22, "transition metal", "solid"), ("chromium", "Cr", 24, "transition metal", "solid"),
    ("manganese", "Mn", 25, "transition metal", "solid"), ("iron", "Fe", 26, "transition metal", "solid"),
    ("cobalt", "Co", 27, "transition metal", "solid"), ("nickel", "Ni", 28, "transition metal", "solid"),
    ("copper", "Cu", 29, "transition metal", "solid"), ("zinc", "Zn", 30, "transition metal", "solid"),
    ("gallium", "Ga", 31, "post-transition metal", "solid"), ("arsenic", "As", 33, "metalloid", "solid"),
    ("bromine", "Br", 35, "halogen", "liquid"), ("krypton", "Kr", 36, "noble gas", "gas"),
    ("silver", "Ag", 47, "transition metal", "solid"), ("tin", "Sn", 50, "post-transition metal", "solid"),
    ("iodine", "I", 53, "halogen", "solid"), ("xenon", "Xe", 54, "noble gas", "gas"),
    ("platinum", "Pt", 78, "transition metal", "solid"), ("gold", "Au", 79, "transition metal", "solid"),
    ("mercury", "Hg", 80, "transition metal", "liquid"), ("lead", "Pb", 82, "post-transition metal", "solid"),
)
# fmt: on

TEMPLATES = (
    "The chemical symbol of {name} is {symbol}.",
    "{symbol} is the symbol for {name}.",
    "The atomic number of {name} is {number}.",
    "Element number {number} is {name}.",
    "{Name} belongs to the {group} group.",
    "At room temperature {name} is a {state}.",
    "{Name}, symbol {symbol}, has {number} protons.",
)


def _fact(rng: random.Random) -> str:
    name, symbol, number, group, state = rng.choice(ELEMENTS)
    template = rng.choice(TEMPLATES)
    return template.format(name=name, Name=name.capitalize(), symbol=symbol, number=number, group=group, state=state)


def paragraphs(count: int, seed: int) -> list[str]:
    """``count`` paragraphs of a few element facts each, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    low, high = FACTS_PER_PARAGRAPH
    return [" ".join(_fact(rng) for _ in range(rng.randint(low, high))) for _ in range(count)]


def build_key() -> str:
    digest = hashlib.sha256()
    for module_file in (Path(__file__), Path(builder.__file__)):
        digest.update(module_file.read_bytes())
    return digest.hexdigest()[:16]


def build(destination: str | os.PathLike, force: bool = False) -> Path:
    """Writes the domain datasets into ``destination`` unless a build with the same key is there; returns the folder.

    Written in a sibling temporary folder that replaces ``destination`` only when complete."""

    def write(staging: Path) -> None:
        texts = {name: paragraphs(count, seed=SEED + index) for index, (name, count) in enumerate(DATASETS.items())}
        prose = {"columns": {"prompt": "text"}}
        builder.write_datasets(staging, {name: ([{"text": text} for text in texts[name]], prose) for name in texts})

    return builder.build_once(Path(destination).resolve(), build_key(), write, force=force)

"""A small instruction dataset that the project builds itself, deterministically and without any hub.

Eleven kinds of short tasks (reverse a word, add two numbers, name a capital, ...) that a model of a few million
parameters learns visibly within a few hundred steps on CPU. Every record is drawn from ``random.Random(seed)``
over the fixed tables below, so the same seed gives the same records byte for byte.

The same facts also come as prose ("The capital of Peru is Lima."): the tiny model is pretrained on prose first,
so that fine-tuning on instructions teaches it to answer in the chat format, as with a real base model. Besides
instructions (alpaca format, stage ``sft``) and prose (stage ``pt``), the tasks give preference pairs (stages
``rm`` and ``dpo``: the right answer is chosen, a plausible wrong one rejected) and labelled single answers
(stage ``kto``), so that every LLaMA-Factory stage can be exercised on local files.
"""

from __future__ import annotations

import random
from collections.abc import Callable

WORDS = (
    "apple anchor bakery banana basket beacon bottle bridge butter button candle canyon carpet castle cherry "
    "circle cloud copper cotton crystal desert dinner dragon engine falcon feather forest frozen garden ginger "
    "glacier guitar hammer harbor helmet island jacket jungle kettle ladder lantern lemon letter marble meadow "
    "mirror monkey number orange orchid paddle pencil pepper pillow planet pocket puzzle rabbit ribbon river "
    "rocket saddle salmon shadow silver socket spider spring summer sunset tablet ticket timber tomato tunnel "
    "turtle velvet violet wagon walnut window winter wizard yellow zipper"
).split()

# fmt: off
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "light": "dark", "happy": "sad", "early": "late",
    "open": "closed", "full": "empty", "hard": "soft", "high": "low", "new": "old", "rich": "poor",
    "strong": "weak", "thick": "thin", "wet": "dry", "young": "old", "loud": "quiet", "near": "far",
    "clean": "dirty", "long": "short", "up": "down", "left": "right", "win": "lose", "buy": "sell",
}
# fmt: on

# Each task draws one example: (instruction, input, right answer, a plausible wrong answer).
Example = tuple[str, str, str, str]


def _other_word(rng: random.Random, word: str) -> str:
    return rng.choice([w for w in WORDS if w != word])


def _reverse(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1], word


def _uppercase(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "Write the word in capital letters.", word, word.upper(), word.capitalize()


def _sort_letters(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "Sort the letters of the word alphabetically.", word, "".join(sorted(word)), word[::-1]


def _length(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "How many letters are in the word?", word, str(len(word)), str(len(word) + rng.choice((-2, -1, 1, 2)))


def _first_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    wrong = next(letter for letter in reversed(word) if letter != word[0])  # "window" ends as it starts
    return "What is the first letter of the word?", word, word[0], wrong


def _repeat(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "Repeat the word three times.", word, " ".join([word] * 3), " ".join([word] * 2)


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(100), rng.randrange(100)
    return "Add the two numbers.", f"{a} + {b}", str(a + b), str(a + b + rng.choice((-10, -1, 1, 10)))


def _larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(1000), 2)
    return "Which number is larger?", f"{a}, {b}", str(max(a, b)), str(min(a, b))


def _capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    wrong = CAPITALS[rng.choice([c for c in sorted(CAPITALS) if c != country])]
    return f"What is the capital of {country}?", "", CAPITALS[country], wrong


def _opposite(rng: random.Random) -> Example:
    word = rng.choice(sorted(OPPOSITES))
    return "Give the opposite of the word.", word, OPPOSITES[word], word


def _next_word(rng: random.Random) -> Example:
    index = rng.randrange(len(WORDS) - 1)
    return (
        "Which word comes after this one in the list?",
        WORDS[index],
        WORDS[index + 1],
        _other_word(rng, WORDS[index + 1]),
    )


TASKS: tuple[Callable[[random.Random], Example], ...] = (
    _reverse,
    _uppercase,
    _sort_letters,
    _length,
    _first_letter,
    _repeat,
    _add,
    _larger,
    _capital,
    _opposite,
    _next_word,
)


def examples(count: int, seed: int) -> list[Example]:
    """``count`` examples, tasks in turn, contents drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(count)]


def prose(item: Example) -> str:
    """The fact behind an example as a plain sentence."""
    instruction, query, right, _ = item
    if instruction.startswith("What is the capital of "):
        return f"The capital of {instruction.removeprefix('What is the capital of ').rstrip('?')} is {right}."
    if instruction == "Add the two numbers.":
        first, second = query.split(" + ")
        return f"{first} plus {second} is {right}."
    return PROSE[instruction].format(query=query, right=right)


PROSE = {
    "Reverse the letters of the word.": "The word {query} spelled backwards is {right}.",
    "Write the word in capital letters.": "The word {query} in capital letters is {right}.",
    "Sort the letters of the word alphabetically.": "The letters of {query} in alphabetical order are {right}.",
    "How many letters are in the word?": "The word {query} has {right} letters.",
    "What is the first letter of the word?": "The first letter of {query} is {right}.",
    "Repeat the word three times.": "The word {query} three times is {right}.",
    "Which number is larger?": "Of {query}, the larger number is {right}.",
    "Give the opposite of the word.": "The opposite of {query} is {right}.",
    "Which word comes after this one in the list?": "In the list, {right} comes after {query}.",
}


def as_instructions(items: list[Example]) -> list[dict]:
    """Alpaca records for stage ``sft``."""
    return [{"instruction": ins, "input": inp, "output": right} for ins, inp, right, _ in items]


def as_text(items: list[Example]) -> list[dict]:
    """Prose records for stage ``pt``."""
    return [{"text": prose(item)} for item in items]


def as_preferences(items: list[Example]) -> list[dict]:
    """Pairwise records for stages ``rm`` and ``dpo``: the right answer is chosen, the wrong one rejected."""
    return [{"instruction": ins, "input": inp, "chosen": right, "rejected": wrong} for ins, inp, right, wrong in items]


def as_kto(items: list[Example]) -> list[dict]:
    """Single answers labelled good (``true``) or bad (``false``), alternating, for stage ``kto``."""
    return [
        {"instruction": ins, "input": inp, "output": right if i % 2 == 0 else wrong, "label": i % 2 == 0}
        for i, (ins, inp, right, wrong) in enumerate(items)
    ]

"""The offline corpus: the CPython standard library sources every Python install carries.

Files are split deterministically into train and held-out by a hash of their path relative to the
stdlib root, so the split is the same on every machine with the same Python version.
"""
from __future__ import annotations

import ast
import random
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 8  # of non-test modules; held out from tokenizer and model training


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test(rel: str) -> bool:
    return "/test/" in f"/{rel}" or "/tests/" in f"/{rel}" or "idle_test" in rel


def _is_generated(rel: str) -> bool:
    # Codec tables and build data are near-copies of each other: too easy to predict to be
    # honest evaluation text, so they always stay in the training split.
    return rel.startswith("encodings/") or rel.startswith("_sysconfigdata")


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Return (train_files, held_out_files), each sorted by path."""
    root = root or stdlib_root()
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if not _is_test(rel) and not _is_generated(rel) and zlib.crc32(rel.encode()) % 100 < HELD_OUT_PERCENT:
            held_out.append(path)
        else:
            train.append(path)
    return train, held_out


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Prompts for distilling a draft from the default target (models.build) and measuring the pair
# (models.evaluate): chat instructions (through the model's chat template), raw code, raw prose.
# Each prompt is held out or not by a hash of its text (code prompts: by their file's split), so
# the split is the same on every machine and a held-out prompt is never trained on.
# --------------------------------------------------------------------------------------------

PROMPT_HELD_OUT_PERCENT = 10

_TOPICS = """photosynthesis|the water cycle|black holes|the French Revolution|machine learning|
volcanoes|the human heart|climate change|the printing press|honey bees|the Roman Empire|
recycling|the moon landing|vaccines|earthquakes|the internet|electric cars|the stock market|
rainbows|the immune system|coral reefs|the Renaissance|solar panels|dinosaurs|gravity|
the Great Wall of China|sleep|coffee|chess|the Olympic Games|bread baking|the piano|
democracy|friendship|time management|public speaking|the ocean tides|tornadoes|penguins|
the Amazon rainforest|bicycles|the Eiffel Tower|meditation|compound interest|DNA|magnets|
the periodic table|airplanes|the Industrial Revolution|renewable energy|the desert|
volunteering|learning a new language|healthy breakfast|the solar system|trees|rain|
cats|dogs|gardening|ancient Egypt|the Moon|the Sun|football|music|libraries|mountains|
rivers|bridges|robots|the weather|birds|fire safety|exercise|cooking pasta|the brain|
smartphones|electricity|the alphabet|money|cities|farming|winter|summer|trains|
the Pacific Ocean|Mars|glaciers|butterflies|kindness|teamwork|writing an essay|email etiquette|
saving money|first aid|the metric system|fractions|prime numbers|the Pythagorean theorem|
clouds|wind energy|museums|birthday parties|camping|photography|painting|poetry|
video games|social media|traffic lights|pizza|chocolate|tea|the violin|jazz|whales|sharks|
elephants|spiders|ants|mushrooms|the seasons|snow|deserts|islands|lighthouses|castles|
knights|pirates|the Vikings|the Wright brothers|Albert Einstein|Marie Curie|Isaac Newton|
Shakespeare|the Mona Lisa|origami|yoga|marathons|the library card|recipes|soup|apples"""
TOPICS = [t.strip() for t in _TOPICS.replace("\n", "").split("|") if t.strip()]

CHAT_TEMPLATES = [
    "Explain {topic} in simple terms.", "Write a short poem about {topic}.",
    "Give me three interesting facts about {topic}.", "What are the pros and cons of {topic}?",
    "Write a short story that involves {topic}.", "Summarize what {topic} is in two sentences.",
    "How would you explain {topic} to a five-year-old?", "Write a haiku about {topic}.",
    "What is the history of {topic}?", "List five words related to {topic}.",
    "Why is {topic} important?", "Write a tweet about {topic}.",
    "Describe {topic} in one paragraph.", "What questions might a student ask about {topic}?",
    "Give me a fun quiz question about {topic} and its answer.",
    "Write the opening sentence of an essay about {topic}.",
    "What is a common misconception about {topic}?", "Tell me a joke about {topic}.",
]

CODE_TASKS = """reverses a string|returns the n-th Fibonacci number|checks whether a number is prime|
sorts a list of integers with bubble sort|counts the vowels in a string|returns the factorial of n|
finds the largest element of a list|removes duplicates from a list|checks whether a string is a
palindrome|computes the average of a list of numbers|merges two sorted lists|converts Celsius to
Fahrenheit|returns the sum of the digits of an integer|flattens a nested list|counts word
frequencies in a text|finds the greatest common divisor of two numbers|checks whether a year is a
leap year|returns the second largest number in a list|capitalizes every word of a sentence|
computes the power set of a list|implements binary search|returns the transpose of a matrix|
reads a file and returns its number of lines|validates an email address with a regular
expression|returns the n first prime numbers|converts a decimal number to binary|computes the
area of a circle|finds the intersection of two lists|checks whether two strings are anagrams|
rotates a list by k positions|returns the longest word in a sentence|computes the median of a
list|generates a random password|parses a date string in ISO format|chunks a list into pieces of
size n|returns the running sum of a list|counts the lines, words and characters of a file|
implements a stack class with push and pop|implements a queue with two stacks|finds all pairs in
a list that sum to a target|computes the dot product of two vectors|converts a dictionary to a
JSON string|removes punctuation from a string|checks whether parentheses are balanced|returns
the mode of a list|computes the Levenshtein distance between two strings|sorts a dictionary by
value|returns the number of days between two dates|squares every element of a list|merges two
dictionaries|finds the missing number in a list from 1 to n|computes compound interest"""
CODE_TASKS_LIST = [t.strip() for t in CODE_TASKS.replace("\n", " ").split("|") if t.strip()]

CODE_TEMPLATES = [
    "Write a Python function that {task}.", "Write a Python function that {task}. Add a docstring.",
    "How do I write a function in Python that {task}?",
    "Write a JavaScript function that {task}.", "Explain how to write a program that {task}.",
]

QA_TEMPLATES = ["What is the capital of {x}?", "What language is spoken in {x}?",
                "Tell me about the geography of {x}.", "What is {x} famous for?"]
COUNTRIES = """France|Germany|Italy|Spain|Japan|China|India|Brazil|Canada|Mexico|Egypt|Kenya|
Australia|Argentina|Peru|Norway|Sweden|Greece|Turkey|Portugal|Ireland|Poland|Vietnam|Thailand|
Chile|Morocco|Nigeria|Iceland|Finland|the Netherlands""".replace("\n", "").split("|")

PROSE_STARTS = [
    "Once upon a time, in a small village by the sea,", "The most important thing about {topic} is",
    "In this article, we will discuss {topic}.", "{topic_cap} has always fascinated people because",
    "Here is a simple guide to {topic}. First,", "Many people do not know that {topic}",
    "Dear friend, I am writing to tell you about {topic}.", "The history of {topic} begins",
]


@dataclass(frozen=True)
class Prompt:
    kind: str       # "chat" (a user message, to be put through the chat template), "code", "prose"
    text: str


def _held_out_text(text: str) -> bool:
    return zlib.crc32(text.encode()) % 100 < PROMPT_HELD_OUT_PERCENT


def _stdlib_functions(files: list[Path], rng: random.Random, limit: int):
    """(source prefix up to a function's body, its name, its docstring's first line) from files."""
    found = []
    for path in files:
        text = read_text(path)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if node.body and node.lineno > 3:
                    start = max(0, node.lineno - 1 - rng.randint(4, 24))
                    body_line = node.body[0].lineno - 1
                    found.append(("".join(lines[start: body_line]),
                                  doc.strip().splitlines()[0] if doc else None, node.name,
                                  ast.get_source_segment(text, node.args) or ""))
    rng.shuffle(found)
    return found[:limit]


def distill_prompts(held_out: bool, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """A deterministic, shuffled mix: chat instructions (topics, code tasks, facts), chat
    requests made from stdlib docstrings, raw code prefixes and raw prose starts. held_out picks
    the held-out side of every split."""
    rng = random.Random(seed)
    chat = [t.format(topic=topic) for t in CHAT_TEMPLATES for topic in TOPICS]
    chat += [t.format(task=task) for t in CODE_TEMPLATES for task in CODE_TASKS_LIST]
    chat += [t.format(x=x.strip()) for t in QA_TEMPLATES for x in COUNTRIES]
    prose = [s.format(topic=topic, topic_cap=topic[0].upper() + topic[1:])
             for s in PROSE_STARTS for topic in TOPICS]
    prompts = [Prompt("chat", t) for t in dict.fromkeys(chat) if _held_out_text(t) == held_out]
    prompts += [Prompt("prose", t) for t in dict.fromkeys(prose) if _held_out_text(t) == held_out]
    train_files, held_files = split_files()
    files = held_files if held_out else [f for f in train_files if not _is_test(
        f.relative_to(stdlib_root()).as_posix())]
    for prefix, doc, name, args in _stdlib_functions(files, rng, 4000):
        if len(prefix) > 1500:
            prefix = prefix[-1500:].split("\n", 1)[-1]
        # Cut at the last non-blank character: a byte-level BPE merges a newline with the
        # indentation after it, so a prompt ending in "\n" ends in a token never seen there.
        prompts.append(Prompt("code", prefix.rstrip()))
        if doc and len(doc) > 15:
            prompts.append(Prompt("chat", f"Write a Python function `{name}({args})`: {doc}"))
    if not held_out:  # the stdlib repeats some code across files: a held-out text stays held out
        held = {p.text for p in distill_prompts(True, seed=seed)}
        prompts = [p for p in prompts if p.text not in held]
    rng.shuffle(prompts)
    return prompts[:limit]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt as the service feeds them: chat prompts through the model's chat
    template (with the assistant turn opened), raw ones as they are."""
    if prompt.kind == "chat":
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer(prompt.text, add_special_tokens=False)["input_ids"]

"""Examples for training and evaluation: `Example`s from data sets and built-in tasks, and their order.

How an example becomes the token ids the model sees is `prompts.py`.
"""

from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError


@dataclass
class Example:
    """One prompt with its gold answer.

    `prompt` is the question as plain text or a list of chat messages
    ({"role", "content"}); `answer` is the gold final answer (None when the
    data set has none); `meta` holds the example's other fields. `row` is the
    data set row as read, every column under its own name, for reward functions
    (empty for a built-in task).
    """

    prompt: str | list[dict]
    answer: str | None
    meta: dict = field(default_factory=dict)
    row: dict = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------- built-in tasks

def arithmetic_examples(n: int, seed: int = 0, max_operand: int = 99) -> list[Example]:
    """Integer addition asked in words: "What is 37 plus 48?" -> "85".

    Deterministic in `seed`; the embedded demo trains on this task.
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        examples.append(Example(prompt=f"What is {a} plus {b}?", answer=str(a + b), meta={"a": a, "b": b}))
    return examples


def countdown_examples(n: int, seed: int = 0) -> list[Example]:
    """The Countdown game: reach a target from 3–4 numbers with + - * /, each number at most once.

    The target is built from a random expression over some of the numbers, so every
    example is solvable; `meta["expression"]` keeps that construction (one solution of
    possibly many). Intermediate results stay positive integers, as in the game.
    """
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        # Small numbers plus at most one large one, as on the television show.
        numbers = [rng.randint(1, 10) for _ in range(rng.choice([3, 4]))]
        if rng.random() < 0.5:
            numbers[rng.randrange(len(numbers))] = rng.choice([25, 50, 75, 100])
        target, expression = _random_construction(rng, numbers)
        if not 10 <= target <= 999 or target in numbers:
            continue  # too small, too large, or trivial: draw again
        prompt = (f"Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
                  "You may use +, -, * and /, and each number at most once.")
        examples.append(Example(prompt=prompt, answer=str(target),
                                meta={"numbers": numbers, "target": target, "expression": expression}))
    return examples


def _random_construction(rng: random.Random, numbers: list[int]) -> tuple[int, str]:
    """Combine a random subset (two or more) of `numbers` pairwise with random valid operations."""
    pool = [(x, str(x)) for x in rng.sample(numbers, rng.randint(2, len(numbers)))]
    while len(pool) > 1:
        (a, ea), (b, eb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        if a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        pool.append((value, f"({ea} {op} {eb})"))
    value, expression = pool[0]
    return value, expression.removeprefix("(").removesuffix(")")


def multiplication_examples(n: int, seed: int = 0) -> list[Example]:
    """A 3-digit times a 4-digit number: "What is 347 times 2816?" -> "977152".

    Deterministic in `seed`. Too hard for a small model in its head, one call with
    `--tools calculator`: the tool-use demo's task.
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(1000, 9999)
        examples.append(Example(prompt=f"What is {a} times {b}?", answer=str(a * b), meta={"a": a, "b": b}))
    return examples


BUILTIN_TASKS = {"arithmetic": arithmetic_examples, "countdown": countdown_examples,
                 "multiplication": multiplication_examples}
BUILTIN_SIZES = {"train": 10_000, "test": 500, "validation": 500}
HELD_OUT_SEED_OFFSET = 10_000  # test/validation draw from a seed the train split never uses


def _builtin_examples(task: str, split: str, limit: int | None, seed: int) -> list[Example]:
    if split not in BUILTIN_SIZES:
        raise UserError(f"built-in task {task!r} has splits {', '.join(BUILTIN_SIZES)}, not {split!r}")
    n = BUILTIN_SIZES[split] if limit is None else limit
    return BUILTIN_TASKS[task](n, seed=seed if split == "train" else seed + HELD_OUT_SEED_OFFSET)


# ---------------------------------------------------------------- loading data sets

PROMPT_FIELDS = ("question", "problem", "prompt", "query", "input", "instruction")
ANSWER_FIELDS = ("answer", "solution", "final_answer", "target", "output")
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_examples(dataset: str, split: str = "train", dataset_config: str | None = None,
                  prompt_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None, seed: int = 0) -> list[Example]:
    """`Example`s from a built-in task, a local file or folder, or a Hugging Face data set.

    See `load_examples_with_stats`; this drops the count of skipped rows.
    """
    examples, _ = load_examples_with_stats(dataset, split, dataset_config, prompt_field,
                                           answer_field, limit, seed)
    return examples


def load_examples_with_stats(dataset: str, split: str = "train", dataset_config: str | None = None,
                             prompt_field: str | None = None, answer_field: str | None = None,
                             limit: int | None = None,
                             seed: int = 0) -> tuple[list[Example], int]:
    """(examples, number of bad rows skipped).

    `dataset` is, checked in this order: a built-in task name (`arithmetic`,
    `countdown`, `multiplication`); a local .jsonl/.json/.parquet file or a folder of them (a folder
    uses the files whose names contain `split`, else all); a Hugging Face data set
    name, loaded with `datasets.load_dataset` (from its cache when offline).

    Fields are auto-detected (PROMPT_FIELDS, ANSWER_FIELDS) unless named; the other
    fields go to `Example.meta`. Rows with an empty prompt or an answer that is not
    text or a number are skipped. `limit` keeps the first N good rows.

    Alpaca-style rows (`instruction` and `input` fields, the prompt field not named
    or named `instruction`) become the instruction, a blank line and the input; the
    instruction alone when the input is empty.
    """
    if dataset in BUILTIN_TASKS:
        return _builtin_examples(dataset, split, limit, seed), 0
    rows = _load_rows(dataset, split, dataset_config)
    columns = rows.column_names
    prompt_key = _pick_field(columns, prompt_field, PROMPT_FIELDS, "prompt", dataset, required=True)
    answer_key = _pick_field(columns, answer_field, ANSWER_FIELDS, "answer", dataset, required=False)
    alpaca = prompt_field in (None, "instruction") and {"instruction", "input"} <= set(columns) \
        and prompt_key in ("instruction", "input")

    examples, skipped = [], 0
    try:
        for row in rows:
            if limit is not None and len(examples) >= limit:
                break
            example = _row_to_example(row, prompt_key, answer_key, alpaca)
            if example is None:
                skipped += 1
            else:
                examples.append(example)
    except UnicodeDecodeError as e:  # Parquet or Hub data: Arrow checks no UTF-8 until a row is read
        raise UserError(f"{dataset} holds text that is not valid UTF-8 ({e.reason}) at row "
                        f"{len(examples) + skipped + 1}; re-encode it as UTF-8") from e
    if not examples and skipped:
        raise UserError(f"all {skipped} rows of {dataset} lack a usable prompt ({prompt_key!r}) "
                        f"or answer ({answer_key!r}); check --prompt-field/--answer-field")
    if not examples and limit != 0:
        raise UserError(f"{dataset} (split {split!r}) has no rows")
    return examples, skipped


def _load_rows(dataset: str, split: str, dataset_config: str | None):
    """A `datasets.Dataset` from a local path or the Hub; every failure becomes a `UserError`."""
    path = Path(dataset).expanduser()
    with _quiet_datasets() as datasets:
        if path.exists() or path.suffix in DATA_SUFFIXES or dataset.startswith((".", "/", "~")):
            return _load_local(path, split)
        return _load_hub(datasets, dataset, split, dataset_config)


@contextlib.contextmanager
def _quiet_datasets():
    """Import `datasets` with its progress bars and log lines off, restoring them after.

    Its "Generating train split" bars and "Failed to load JSON" log lines go to
    stderr, where the CLI's one-line error message must stand alone.
    """
    # Imported here: `datasets` takes seconds to import and built-in tasks never need it.
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _load_hub(datasets, dataset: str, split: str, dataset_config: str | None):
    try:
        return datasets.load_dataset(dataset, dataset_config, split=split)
    except Exception as e:  # the Hub client raises many types: offline, not found, bad config, bad split
        raise UserError(
            f"could not load data set {dataset!r} (config {dataset_config!r}, split {split!r}): "
            f"{_first_line(e)}; without network access only data sets already cached can load, "
            f"so pass a local .jsonl/.json/.parquet file or a built-in task ({', '.join(BUILTIN_TASKS)})"
        ) from e


def _load_local(path: Path, split: str):
    import datasets

    files = _data_files(path, split)
    builders = {DATA_SUFFIXES[f.suffix] for f in files}
    if len(builders) > 1:
        raise UserError(f"{path} mixes JSON and Parquet files; keep one format per folder")
    builder = builders.pop()
    for f in files:
        # An empty file makes `datasets` fail with an unhelpful StopIteration or "no data".
        if f.stat().st_size == 0 or (f.stat().st_size < 1024 and not f.read_bytes().strip()):
            raise UserError(f"{f} is empty")
        if builder == "json":
            _check_utf8(f)
    try:
        # One "train" split holds whatever files were picked; `split` already chose them.
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:
        what = "JSON lines or a JSON list of records" if builder == "json" else "Parquet"
        names = ", ".join(str(f) for f in files)
        raise UserError(f"{names} is not valid {what}: {_first_line(e.__cause__ or e)}") from e


# Split names as `datasets` infers them from file names (datasets.data_files.SPLIT_KEYWORDS).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
# What separates the words of a file's path, as in `datasets`: "contest_train" is contest + train.
_NAME_SEPARATORS = re.compile(r"[-._ /0-9]+")


def split_keywords(split: str) -> tuple[str, ...]:
    """The names a file of `split` may carry: its group's (validation: val, dev, ...), else `split` itself."""
    split = split.lower()
    return next((names for names in SPLIT_KEYWORDS.values() if split in names), (split,))


def _name_words(path: Path) -> set[str]:
    return {w for w in _NAME_SEPARATORS.split(path.with_suffix("").as_posix().lower()) if w}


def _check_utf8(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line: Arrow would read it and fail row by row."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 at line {number} ({e.reason} at byte {e.start} of the "
                                "line); re-encode the file as UTF-8") from None


def _data_files(path: Path, split: str) -> list[Path]:
    """The data files `path` names: itself, or a folder's files of `split`.

    A folder's file is of a split when a whole word of its path (words are split at
    - . _ / space and digits) is one of the split's names: `contest_train.jsonl` and
    `data/train-00000-of-00001.parquet` are train files. A folder whose files carry no
    split name at all is one train split, as `datasets` reads it.
    """
    if not path.exists():
        raise UserError(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise UserError(f"{path} is not a .jsonl, .json or .parquet file")
        return [path]
    # Recursive, so a downloaded Hub snapshot (data/train-00000-of-00001.parquet) works too.
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise UserError(f"{path} holds no .jsonl, .json or .parquet files")
    words = {f: _name_words(f.relative_to(path)) for f in files}
    in_split = [f for f in files if words[f] & set(split_keywords(split))]
    if in_split:
        return in_split
    all_split_names = {name for names in SPLIT_KEYWORDS.values() for name in names}
    if split_keywords(split) == SPLIT_KEYWORDS["train"] and not any(words[f] & all_split_names for f in files):
        return files
    shown = ", ".join(str(f.relative_to(path)) for f in files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    names = " or ".join(repr(n) for n in split_keywords(split))
    raise UserError(f"no file in {path} is of split {split!r} (its name needs the word {names}; files without a split "
                    f"name form the train split); found: {shown}; choose another --split or point at a file")


def _pick_field(columns: list[str], chosen: str | None, candidates: tuple[str, ...], kind: str,
                dataset: str, required: bool) -> str | None:
    if chosen is not None:
        if chosen not in columns:
            raise UserError(f"{dataset} has no {kind} field {chosen!r}; its fields are: {', '.join(columns)}")
        return chosen
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise UserError(f"{dataset} has none of the {kind} fields {', '.join(candidates)}; its fields are: "
                        f"{', '.join(columns)}; name one with --{kind}-field")
    return found


def _row_to_example(row: dict, prompt_key: str, answer_key: str | None, alpaca: bool = False) -> Example | None:
    """An `Example` from one row, or None when the row is unusable."""
    prompt_keys = ("instruction", "input") if alpaca else (prompt_key,)
    prompt = _alpaca_prompt(row["instruction"], row["input"]) if alpaca else row[prompt_key]
    if not _valid_prompt(prompt):
        return None
    answer = None
    if answer_key is not None:
        answer = _answer_text(row[answer_key])
        if answer is None:
            return None
    meta = {k: v for k, v in row.items() if k not in (*prompt_keys, answer_key)}
    return Example(prompt=prompt, answer=answer, meta=meta, row=dict(row))


def _alpaca_prompt(instruction, input_text):
    """Alpaca's prompt: the instruction, a blank line, the input; either alone when the other is empty."""
    if not all(isinstance(t, str) or t is None for t in (instruction, input_text)):
        return None
    return "\n\n".join(t.strip() for t in (instruction, input_text) if t and t.strip())


def _valid_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return (isinstance(prompt, list) and len(prompt) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt))


def _answer_text(answer) -> str | None:
    """The gold answer as text; None when it is missing, empty, or not text or a number."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, float) and answer.is_integer():
        # Arrow turns an integer column into floats when any row holds a float: 18 -> 18.0.
        return str(int(answer))
    if isinstance(answer, (int, float)):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------- order of examples

def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_examples), fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


def take_examples(examples: list[Example], seed: int, position: int, count: int) -> list[Example]:
    """`count` examples from global `position` in the endless stream of per-epoch shuffles.

    The stream is epoch_order(seed, 0), then epoch_order(seed, 1), ...; the trainer stores
    only `position` to resume exactly where it stopped.
    """
    if not examples:
        raise UserError("the data set has no examples to train on")
    n = len(examples)
    taken = []
    while len(taken) < count:
        epoch, offset = divmod(position + len(taken), n)
        order = epoch_order(n, seed, epoch)
        taken.extend(examples[i] for i in order[offset:offset + count - len(taken)])
    return taken

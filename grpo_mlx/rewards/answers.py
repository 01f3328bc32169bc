"""Answer extraction and math equivalence: what a completion answers, and whether it is the gold answer.

Pure Python, no MLX: the `accuracy` reward and `eval` both score with these.

Choices, and why:
1. Answer extraction follows what models actually write: an R1 `<answer>` tag
   beats `\\boxed{}` beats a GSM8K `####` line beats the last number in the text.
2. Numbers compare by value (integers exactly, others within a relative
   tolerance of 1e-6), after removing what does
   not change the value: thousands commas, `$`, `%`, units, a trailing period.
3. With the optional `math-verify` package (`pip install "grpo-mlx[math]"`, the
   checker open-r1 uses) installed, answers this checker does not find equal are
   also compared symbolically through math-verify's `parse` and `verify`
   (`\\frac{1}{2}` = 0.5, `\\sqrt{2}/2` = `\\frac{\\sqrt2}{2}`, intervals, sets):
   the "math-verify" backend. Two plain numbers are left to this checker, which
   handles GSM8K's surface forms ("18 dollars", "1,000") and is fast, and so is a gold
   answer with no digit and no LaTeX ("Paris"), which math-verify would read as a
   product of symbols. GRPO_MLX_ANSWER_BACKEND=builtin (or the `backend` argument)
   keeps this checker alone. math-verify bounds each parse and comparison with its own
   SIGALRM timeout, which works only in a main thread (the reward worker process runs
   calls in its main thread); elsewhere the reward's --reward-timeout is the bound.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import threading

from ..core.errors import UserError

REL_TOL = 1e-6  # numeric answers equal within this relative tolerance


# ---------------------------------------------------------------- numbers

# A plain number: optional sign (not after a word or digit, so "3-5" is not -5),
# thousands commas only in groups of three, optional decimals.
_NUM = r"(?:(?<![\w.)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.)\]}])-)?\.\d+"
_TEX_FRAC = rf"-?\\[dt]?frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}|-?\\[dt]?frac(\d)(\d)"
_SLASH_FRAC = rf"({_NUM})\s*/\s*({_NUM})"
# Numbers as they appear in running text: fractions first, so "3/4" is one number.
_NUMBER_IN_TEXT = re.compile(rf"{_TEX_FRAC}|(?:{_NUM})/(?:{_NUM})(?![\d/])|{_NUM}")

_UNIT = r"[A-Za-z][A-Za-z/^.²³]*\d?"
_DECORATIONS = [
    (re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}"), r" \1 "),  # unwrap \text{ dollars}
    (re.compile(r"\^\s*\{?\\circ\}?|°"), ""),  # degrees
    (re.compile(r"\\[!,]"), ""),  # thin spaces: 1\,000
    (re.compile(r"\{,\}"), ","),  # 1{,}000
    (re.compile(r"\\[;: ]|\\left|\\right"), " "),  # LaTeX spacing
    (re.compile(r"\\?[$%€£¥]"), ""),  # currency, percent
    (re.compile(r"[−–]"), "-"),  # unicode minus and en dash
]


def _strip_decorations(text: str) -> str:
    s = text
    for pattern, repl in _DECORATIONS:
        s = pattern.sub(repl, s)
    s = s.strip().strip("*").strip()  # markdown bold: **18**
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    s = re.sub(r"^(?:[A-Za-z]\w*\s*)?=\s*", "", s)  # "x = 5" -> "5"
    return s.rstrip(".!").strip()


def _plain_value(token: str) -> float:
    return float(token.replace(",", ""))


def to_number(text: str | None) -> float | None:
    """The value of an answer that is one number, or None.

    Accepts what does not change the value: `$`, `%`, thousands commas, units
    after the number ("18 dollars", "5 km/h"), a trailing period, `x = `
    before it, and fractions `3/4`, `\\frac{3}{4}`, `\\dfrac34`. Text that is
    more than one number ("1, 2", "2\\sqrt{3}") is not a number.
    """
    if text is None:
        return None
    s = _strip_decorations(text)
    match = re.fullmatch(rf"({_TEX_FRAC}|{_SLASH_FRAC}|{_NUM})(?:\s*{_UNIT}(?:\s+{_UNIT})*)?", s)
    return None if match is None else _token_value(match.group(1))


def _token_value(token: str) -> float | None:
    """Value of one number token: plain, a/b, or \\frac{a}{b}; None for division by zero."""
    token = token.strip()
    if "frac" in token:
        sign = -1.0 if token.startswith("-") else 1.0
        m = re.search(rf"frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}|frac(\d)(\d)", token)
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        value = _divide(_plain_value(num), _plain_value(den))
        return None if value is None else sign * value
    if re.search(r"\d\s*/", token):
        num, den = token.split("/")
        return _divide(_plain_value(num), _plain_value(den))
    return _plain_value(token)


def _divide(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def last_number(text: str) -> str | None:
    """The last number in running text, as written ("1,234", "3/4", "\\frac{1}{2}", "-5")."""
    matches = list(_NUMBER_IN_TEXT.finditer(text.replace("−", "-")))
    return matches[-1].group(0) if matches else None


# ---------------------------------------------------------------- answer extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def _answer_tag(text: str) -> str | None:
    """Content of the last <answer>…</answer>; an unclosed last tag runs to the end (truncated output)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    matches = _ANSWER_TAG.findall(text)
    if "</answer>" not in text[start:]:
        return text[start + len("<answer>"):].strip() or None
    return matches[-1].strip() if matches else None


def _boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{…} (braces nested), or of `\\boxed 5`."""
    for match in reversed(list(_BOXED.finditer(text))):
        rest = text[match.end():].lstrip()
        if not rest.startswith("{"):
            token = re.match(r"[^\s$]+", rest)
            if token:
                return token.group(0)
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                content = rest[1:i].strip()
                if content:
                    return content
                break
    return None


def _hash_line(text: str) -> str | None:
    """The rest of the line after the last GSM8K `####`."""
    start = text.rfind("####")
    if start < 0:
        return None
    return text[start + 4:].split("\n", 1)[0].strip() or None


def marked_answer(text: str) -> str | None:
    """The raw text the completion marks as its answer: <answer> tag > \\boxed{} > ####, else None."""
    tag = _answer_tag(text)
    if tag is not None:
        return _boxed(tag) or tag
    return _boxed(text) or _hash_line(text)


def extract_answer(text: str | None) -> str | None:
    """The final answer a completion gives, as written, or None if it gives none.

    Priority: `<answer>` tag > last `\\boxed{}` > `####` line > last number in
    the text. The content of an answer tag or `####` line that is not itself a
    number is reduced to the last number inside it ("The answer is 72." -> "72"),
    when there is one; \\boxed{} content is kept as is, since it is often an
    expression.
    """
    if text is None:
        return None
    tag = _answer_tag(text)
    if tag is not None:
        boxed = _boxed(tag)
        return boxed if boxed is not None else _number_inside(tag)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    line = _hash_line(text)
    if line is not None:
        return _number_inside(line)
    return last_number(text)


def _number_inside(content: str) -> str:
    if to_number(content) is not None:
        return content
    return last_number(content) or content


def parse_gold(answer: str | None) -> str | None:
    """The final answer in a gold field: a full GSM8K solution ("…\\n#### 72") gives "72".

    A gold field with a `####` line, a \\boxed{} or an <answer> tag is reduced
    to it; anything else is taken whole, since gold fields are usually the
    answer itself (and may be non-numeric, like "(1, 2)").
    """
    if answer is None:
        return None
    answer = str(answer)
    if "####" in answer:
        return _hash_line(answer)
    return marked_answer(answer) or answer.strip()


def normalize_text(text: str) -> str:
    """Non-numeric answers compare after: strip, lowercase, drop surrounding $, spaces, trailing period."""
    s = text.strip().lower()
    s = re.sub(r"^\$+|\$+$", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def numbers_equal(a: float, b: float) -> bool:
    """Equal within REL_TOL, but integers exactly: 1e-6 of 1,450,000 is more than 1."""
    if a.is_integer() and b.is_integer():
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL)


BACKENDS = ("builtin", "math-verify")
BACKEND_ENV = "GRPO_MLX_ANSWER_BACKEND"
MATH_VERIFY_TIMEOUT = 2  # seconds per parse and per comparison (math-verify's own default is 5)


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def answer_backend(backend: str | None = None) -> str:
    """The equivalence backend to use: `backend`, else $GRPO_MLX_ANSWER_BACKEND, else
    "math-verify" where it is installed and "builtin" where not."""
    backend = backend or os.environ.get(BACKEND_ENV) or ("math-verify" if math_verify_installed() else "builtin")
    if backend not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={backend!r} is not a backend: use {' or '.join(BACKENDS)}")
    if backend == "math-verify" and not math_verify_installed():
        raise UserError(f'{BACKEND_ENV}=math-verify needs the math-verify package: pip install "grpo-mlx[math]"')
    return backend


def answers_equal(predicted: str | None, gold: str | None, backend: str | None = None) -> bool:
    """Whether a completion (or an answer) gives the gold answer.

    Both sides are reduced to their final answer first (`extract_answer` for the
    prediction, `parse_gold` for the gold). Numbers compare by value, integers
    exactly and others within a relative tolerance of 1e-6: 0.5 = 1/2 = \\frac{1}{2}, 1,000 = 1000,
    $18 = 18.00, 50% = 50. A non-numeric gold compares with `normalize_text`,
    against the extracted answer or the raw marked answer (so `<answer>(1, 2)</answer>`
    matches gold "(1, 2)"). None and an empty gold equal nothing.

    `backend` (see `answer_backend`): "math-verify" also accepts what math-verify
    finds equal, where this checker does not (module docstring, point 3).
    """
    if predicted is None or gold is None:
        return False
    gold_answer = parse_gold(gold)
    if not gold_answer or not normalize_text(gold_answer):  # an empty gold matches nothing
        return False
    answer = extract_answer(predicted)
    gold_value = to_number(gold_answer)
    value = to_number(answer) if answer is not None else None
    if gold_value is not None and value is not None:
        return numbers_equal(value, gold_value)  # two numbers: final under either backend
    target = normalize_text(gold_answer)
    candidates = [answer, marked_answer(predicted), predicted]
    if gold_value is None and any(c is not None and normalize_text(c) == target for c in candidates):
        return True
    if answer_backend(backend) != "math-verify" or not re.search(r"[\d\\^]", gold_answer):
        return False
    if gold_value is not None and _unevaluated_arithmetic(answer, marked_answer(predicted)):
        return False  # gold 977152, answer \boxed{347 \cdot 2816}: the model must do the arithmetic itself
    return math_verify_equal(predicted, gold_answer, answer)


# An operator between two operands: what a numeric gold answer's candidate must not leave unevaluated.
_ARITHMETIC = re.compile(r"[\d)}]\s*(?:[+*/^×÷-]|\\cdot|\\times|\\div)\s*[\d({\\]")


def _unevaluated_arithmetic(*answers: str | None) -> bool:
    return any(a is not None and _ARITHMETIC.search(a) for a in answers)


def math_verify_equal(predicted: str, gold_answer: str, answer: str | None) -> bool:
    """math-verify's verdict: the gold answer against the extracted answer, the marked answer
    read as math, and the marked answer (or, when nothing is marked, the whole completion) as
    text that math-verify searches itself."""
    gold_parsed = _math_verify_parse(gold_answer, wrap=True)
    if not gold_parsed:
        return False
    marked = marked_answer(predicted)
    candidates = [(answer, True), (marked, True), (marked if marked is not None else predicted, False)]
    for text, wrap in dict.fromkeys((t, w) for t, w in candidates if t):
        parsed = _math_verify_parse(text, wrap)
        if parsed and _math_verify().verify(gold_parsed, parsed, timeout_seconds=_math_verify_timeout()):
            return True
    return False


def _math_verify():
    import math_verify  # imported on first use: it loads sympy (about a second)

    return math_verify


def _math_verify_timeout() -> int | None:
    # math-verify's timeout is a SIGALRM, which Python allows in the main thread only.
    return MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None


def _math_verify_parse(text: str, wrap: bool) -> list:
    """math-verify's parse of `text`; `wrap`: an answer alone, read as LaTeX math ($...$) unless marked already."""
    if wrap and "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    return _math_verify().parse(text, parsing_timeout=_math_verify_timeout())


def same_answer(a: str, b: str) -> bool:
    """Whether two extracted answers agree: by value when both are numbers, else as normalised text."""
    value_a, value_b = to_number(a), to_number(b)
    if value_a is not None and value_b is not None:
        return numbers_equal(value_a, value_b)
    return normalize_text(a) == normalize_text(b)

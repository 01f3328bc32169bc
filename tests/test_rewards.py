"""Rewards: answer extraction on real GSM8K text, math equivalence, built-ins, plug-ins."""

import json
import math
import threading
import time
from pathlib import Path

import pytest

from grpo_mlx.rewards import answers
from grpo_mlx.rewards.answers import answers_equal, extract_answer, parse_gold
from grpo_mlx.core.errors import UserError
from grpo_mlx.rewards import (
    RewardError,
    combine_rewards,
    get_reward,
    list_rewards,
    register_reward,
    score_column,
    score_completions,
)

GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


BUILTINS = ("accuracy", "format", "format_strict", "tag_count", "reasoning_steps", "length", "cosine",
            "repetition", "overlong")


def gsm8k_gold():
    if not GSM8K_TEST.exists():
        pytest.skip(f"{GSM8K_TEST} not present")
    return [json.loads(line)["answer"] for line in GSM8K_TEST.read_text().splitlines() if line.strip()]


def bump_final_number(solution: str) -> str:
    """The solution with its #### answer changed by +1 (commas and sign handled)."""
    head, _, final = solution.rpartition("####")
    return f"{head}#### {int(final.strip().replace(',', '')) + 1}"


# ---------------------------------------------------------------- real GSM8K


def test_gsm8k_gold_solutions_score_one():
    gold = gsm8k_gold()
    assert len(gold) == 1319
    assert get_reward("accuracy")(gold, gold) == [1.0] * len(gold)


def test_gsm8k_solutions_with_changed_final_number_score_zero():
    gold = gsm8k_gold()
    wrong = [bump_final_number(s) for s in gold]
    assert get_reward("accuracy")(wrong, gold) == [0.0] * len(gold)


def test_gsm8k_answers_in_r1_and_boxed_forms_score_one():
    gold = gsm8k_gold()
    r1 = [f"<think>{s.rpartition('####')[0]}</think>\n<answer>{parse_gold(s)}</answer>" for s in gold]
    boxed = [f"{s.rpartition('####')[0]}So the answer is $\\boxed{{{parse_gold(s)}}}$." for s in gold]
    accuracy = get_reward("accuracy")
    assert accuracy(r1, gold) == [1.0] * len(gold)
    assert accuracy(boxed, gold) == [1.0] * len(gold)


def test_parse_gold_reduces_a_solution_to_its_final_answer():
    assert parse_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert parse_gold("#### 1,450,000") == "1,450,000"
    assert parse_gold(" 72 ") == "72"
    assert parse_gold(None) is None


# ---------------------------------------------------------------- extraction and equivalence


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        (r"so $\boxed{\frac{1}{2}}$ and not \boxed{3}", "3"),  # last boxed wins
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),  # nested braces kept whole
        (r"<answer>\boxed{7}</answer> \boxed{9}", "7"),  # tag beats boxed outside it
        (r"\boxed{5}\n#### 6", "5"),  # boxed beats ####
        ("<answer>The answer is 72.</answer>", "72"),
        ("<answer>blue</answer>", "blue"),
        ("It costs 3 + 4 = 7 dollars.", "7"),
        ("between 3-5 apples", "5"),  # a hyphen after a digit is not a minus sign
        ("The total is -12.5.", "-12.5"),
        ("Result: 1,234,567 units", "1,234,567"),
        ("she used 3/4 of it", "3/4"),
        ("no digits here", None),
    ],
)
def test_extract_answer_follows_priority(text, expected):
    assert extract_answer(text) == expected


# The equivalence tables run under each backend installed: "builtin" always, "math-verify" with grpo-mlx[math].
BACKENDS = ["builtin"] + (["math-verify"] if answers.math_verify_installed() else [])

EQUAL_CASES = [
    # (predicted, gold, equal), or (predicted, gold, equal under builtin, equal under math-verify)
    ("72", "72", True),
    ("#### 72", "Some work.\n#### 72", True),
    ("so the answer is 72.", "72", True),
    ("72.", "72", True),
    ("18.00", "18", True),
    ("$18", "18", True),
    (r"\$18", "18", True),
    ("18 dollars", "18", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    ("1,000", "1000", True),
    ("#### 1,450,000", "1450000", True),
    ("1000", "1,000", True),
    (r"\boxed{1\,000}", "1000", True),
    (r"\boxed{1{,}000}", "1000", True),
    ("50%", "50", True),
    (r"50\%", "50", True),
    ("0.5", "1/2", True),
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{1}{2}", "1/2", True),
    (r"\tfrac12", "0.5", True),
    (r"\boxed{\frac{3}{4}}", "0.75", True),
    (r"The answer is \boxed{\dfrac{3}{4}}.", "3/4", True),
    ("-5", "-5", True),
    ("The change is -5 degrees", "-5", True),
    (r"-\frac{1}{2}", "-0.5", True),
    ("<answer>42</answer>", "42", True),
    ("<answer>\n  The answer is **42**.\n</answer>", "42", True),
    ("<think>7 or 8?</think><answer>8</answer>", "#### 8", True),
    ("x = 12", "12", True),
    ("0.3333333", "1/3", True),  # within relative 1e-6
    ("<answer>Paris</answer>", "paris", True),
    ("<answer>(1, 2)</answer>", "(1, 2)", True),
    (r"\boxed{x^{2}}", "$x^2$", False, True),  # builtin: braces differ after normalisation
    (r"\boxed{x^2}", "$x^2$", True),
    ("72", "73", False),
    ("#### 19", "Janet sells 9 eggs.\n#### 18", False),
    ("5", "-5", False),
    ("0.5", "5", False),
    ("1,000", "100", False),
    ("0.333", "1/3", False),  # outside the tolerance
    (r"\boxed{3}", "4", False),
    (r"\boxed{4} but then \boxed{3}", "4", False),
    ("<answer>12</answer> 13", "13", False),  # the tag wins over the last number
    ("the answer is 50%", "0.5", False),  # % is dropped, not divided
    ("no number at all", "7", False),
    ("<answer>London</answer>", "Paris", False),
    (None, "7", False),
    ("7", None, False),
    (None, None, False),
    ("", "", False),
]


# MATH-style answers (LaTeX, intervals, sets, expressions): what each backend says. The builtin checker
# compares numbers and text only; math-verify also compares symbolically. Where the two differ, math-verify
# is right on every row. Unevaluated arithmetic (6 \cdot 3 for gold 18) is refused under both: a reward would pay for it.
MATH_CASES = [
    # (predicted, gold, equal under builtin, equal under math-verify)
    (r"\boxed{\frac{1}{2}}", "0.5", True, True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True, True),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", False, True),
    (r"\boxed{\frac{\sqrt2}{2}}", r"\frac{1}{\sqrt{2}}", False, True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", False, False),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", False, True),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{12}", False, False),
    (r"\boxed{[1, 2)}", "[1,2)", True, True),
    (r"\boxed{(1, 2]}", "[1,2)", False, False),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True, True),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3]", False, False),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", False, True),  # a set in another order
    (r"\boxed{\{1, 3\}}", r"\{1,2\}", False, False),
    (r"\boxed{x^{2}+2x+1}", r"(x+1)^2", False, True),
    (r"\boxed{x^2+1}", r"(x+1)^2", False, False),
    (r"\boxed{\dfrac{\pi}{4}}", r"\frac{\pi}{4}", False, True),
    (r"\boxed{\frac{\pi}{3}}", r"\frac{\pi}{4}", False, False),
    (r"\boxed{6 \cdot 3}", "18", False, False),  # unevaluated arithmetic never equals a numeric gold (see below)
    (r"\boxed{2^{10}}", "1024", False, False),
    (r"\boxed{2^{10}}", "1000", False, False),
    (r"\boxed{\frac{7}{3}}", r"2\frac{1}{3}", False, True),  # a mixed number
    (r"\boxed{x = 5}", "5", True, True),
    (r"\boxed{y = 2x + 3}", "2x+3", False, True),
    (r"The answer is $\frac{\sqrt{2}}{2}$.", r"\frac{\sqrt2}{2}", False, True),  # nothing marked
    (r"<answer>\frac{3}{4}\pi</answer>", r"\frac{3\pi}{4}", False, True),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True, True),
    (r"\boxed{\frac{1}{2}}", "-0.5", False, False),
    (r"\boxed{90^\circ}", "90", True, True),
    (r"\boxed{e^{i\pi}}", "-1", False, False),  # equal, but neither backend simplifies it
    (r"\boxed{1 + i}", "1-i", False, False),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True, True),
    (r"\boxed{\log_2 8}", "3", False, True),
    ("<answer>Pairs</answer>", "Paris", False, False),  # math-verify would read both as a product of letters
    # A numeric gold needs the arithmetic done: math-verify alone would score these correct (reward hacking).
    (r"\boxed{347 \cdot 2816}", "977152", False, False),
    (r"The answer is \boxed{2 + 3}", "5", False, False),
]


def expected_under(backend: str, case: tuple) -> bool:
    """A table row's expected verdict under `backend`: its one column, or the column of that backend."""
    if len(case) == 3:
        return case[2]
    return case[2] if backend == "builtin" else case[3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EQUAL_CASES, ids=[f"{c[0]!r}|{c[1]!r}" for c in EQUAL_CASES])
def test_answers_equal_table(case, backend):
    assert answers_equal(case[0], case[1], backend=backend) is expected_under(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MATH_CASES, ids=[f"{c[0]!r}|{c[1]!r}" for c in MATH_CASES])
def test_math_answers_table(case, backend):
    assert answers_equal(case[0], case[1], backend=backend) is expected_under(backend, case)


def test_answers_equal_table_is_large_and_balanced():
    assert len(EQUAL_CASES) >= 40 and len(MATH_CASES) >= 30
    for backend in answers.BACKENDS:
        verdicts = [expected_under(backend, c) for c in EQUAL_CASES + MATH_CASES]
        assert sum(verdicts) >= 15 and verdicts.count(False) >= 15


def test_answer_backend_is_math_verify_where_installed_and_the_env_var_picks_it(monkeypatch):
    monkeypatch.delenv(answers.BACKEND_ENV, raising=False)
    assert answers.answer_backend() == ("math-verify" if answers.math_verify_installed() else "builtin")
    monkeypatch.setenv(answers.BACKEND_ENV, "builtin")
    assert answers.answer_backend() == "builtin"
    assert get_reward("accuracy")([r"\boxed{2\sqrt{3}}"], [r"\sqrt{12}"]) == [0.0]  # the builtin checker's verdict
    monkeypatch.setenv(answers.BACKEND_ENV, "sympy")
    with pytest.raises(UserError, match="GRPO_MLX_ANSWER_BACKEND='sympy' is not a backend: use builtin or math-verify"):
        answers.answer_backend()


def test_math_verify_backend_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(answers, "math_verify_installed", lambda: False)
    with pytest.raises(UserError, match=r'pip install "grpo-mlx\[math\]"'):
        answers_equal(r"\boxed{2\sqrt{3}}", r"\sqrt{12}", backend="math-verify")
    monkeypatch.delenv(answers.BACKEND_ENV, raising=False)
    assert answers.answer_backend() == "builtin"


needs_math_verify = pytest.mark.skipif(not answers.math_verify_installed(), reason='needs pip install "grpo-mlx[math]"')


@needs_math_verify
def test_accuracy_checks_latex_through_math_verify_in_the_reward_worker(monkeypatch):
    # With --reward-timeout the call runs in the worker process, where math-verify's SIGALRM timeout is allowed.
    monkeypatch.delenv(answers.BACKEND_ENV, raising=False)
    texts = [r"\boxed{\frac{\sqrt2}{2}}", r"so $\boxed{[1, 2)}$", r"\boxed{\{2, 1\}}", r"\boxed{\frac{\sqrt3}{2}}"]
    golds = [r"\sqrt{2}/2", "[1,2)", r"\{1,2\}", r"\sqrt{2}/2"]
    column, timeouts = score_column("accuracy", get_reward("accuracy"), texts, golds, {}, timeout=60)
    assert column == [1.0, 1.0, 1.0, 0.0] and timeouts == 0


@needs_math_verify
def test_math_verify_runs_outside_the_main_thread():
    # SIGALRM cannot be set there: math-verify runs without its own timeout instead of raising.
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_equal(r"\boxed{2\sqrt{3}}", r"\sqrt{12}", backend="math-verify")))
    thread.start()
    thread.join(60)
    assert results == [True]


@needs_math_verify
def test_a_pathological_answer_is_cut_off_by_math_verify_own_timeout():
    start = time.monotonic()
    assert answers_equal(r"\boxed{10^{10^{10^{10}}}}", "1", backend="math-verify") is False
    assert time.monotonic() - start < 4 * answers.MATH_VERIFY_TIMEOUT + 5


# ---------------------------------------------------------------- built-in rewards


def test_accuracy_is_none_without_gold():
    assert get_reward("accuracy")(["7", "7", "8"], ["7", None, "7"]) == [1.0, None, 0.0]


def test_format_soft_accepts_tags_in_order_anywhere_strict_only_whole_completion():
    texts = [
        "<think>a</think>\n<answer>1</answer>",  # both
        "  <think>\na\n</think> <answer>1</answer>\n",  # both: surrounding whitespace allowed
        "Sure! <think>a</think> so <answer>1</answer>",  # soft only: text around tags
        "<think>a</think><answer>1</answer><answer>2</answer>",  # soft only: extra tag
        "<answer>1</answer><think>a</think>",  # neither: wrong order
        "<think>a</think> the answer is 1",  # neither
    ]
    assert get_reward("format")(texts, [None] * 6) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert get_reward("format_strict")(texts, [None] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_tag_count_gives_quarter_per_tag_seen_exactly_once():
    texts = [
        "<think>a</think><answer>1</answer>",
        "<think>a</think>",
        "<think>a</think><answer>1</answer><answer>2</answer>",  # answer tags twice
        "nothing",
    ]
    assert get_reward("tag_count")(texts, [None] * 4) == [1.0, 0.5, 0.5, 0.0]


def test_reasoning_steps_saturates_at_three_markers():
    texts = [
        "Step 1: add. Step 2: multiply. Step 3: done. Step 4: check.",
        "First, add.\nNext, multiply.",
        "1. add\n2. multiply\n3. done",
        "just 42",
    ]
    assert get_reward("reasoning_steps")(texts, [None] * 4) == pytest.approx([1.0, 2 / 3, 1.0, 0.0])


def test_length_reward_is_kimi_lambda_per_group():
    # group 1 (lengths 10, 20, 30): lam = 0.5, 0, -0.5, the third is wrong: min(0, lam);
    # group 2: equal lengths -> lam = 0
    completions = ["7", "7", "8", "7", "8", "7"]
    out = get_reward("length")(completions, ["7"] * 6, group_size=3, completion_lengths=[10, 20, 30, 5, 5, 5])
    assert out == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])
    wrong_short = get_reward("length")(["8", "8"], ["7", "7"], completion_lengths=[1, 3])
    assert wrong_short == [0.0, -0.5]  # wrong answers never gain: min(0, lam)


def test_length_reward_counts_characters_by_default_and_whole_batch_is_one_group():
    out = get_reward("length")(["7", "so 7", "so so 7"], ["7"] * 3)  # lengths 1, 4, 7
    assert out == pytest.approx([0.5, 0.0, -0.5])


def test_cosine_reward_endpoints():
    cosine = get_reward("cosine")
    lengths = [0, 100, 50, 0, 100, 200]
    completions = ["7", "7", "7", "8", "8", "8"]
    out = cosine(completions, ["7"] * 6, max_completion_length=100, completion_lengths=lengths)
    assert out == pytest.approx([1.0, 0.5, 0.75, -0.5, 0.0, 0.0])  # clipped beyond max length
    by_chars = cosine(["8" * 500 + " 8"], ["7"])  # wrong, 502 characters of the default max 1000
    assert by_chars[0] == pytest.approx(-0.5 + 0.5 * 0.5 * (1 - math.cos(math.pi * 502 / 1000)))
    assert cosine(["7"], [None]) == [None]


def test_repetition_penalty():
    repetition = get_reward("repetition")
    texts = ["a b a b a b", "one two three four", "too short", ""]
    # "a b a b a b": 4 trigrams, 2 unique -> -1 * (1 - 2/4)
    assert repetition(texts, [None] * 4) == [-0.5, 0.0, 0.0, 0.0]


def test_overlong_three_regions():
    overlong = get_reward("overlong")
    lengths = [0, 768, 800, 1024, 1025]  # L_max 1024, buffer 256: penalty starts after 768
    out = overlong(["x"] * 5, [None] * 5, completion_lengths=lengths)
    assert out == pytest.approx([0.0, 0.0, -32 / 256, -1.0, -1.0])
    out = overlong(["x"] * 3, [None] * 3, completion_lengths=[50, 75, 101], max_completion_length=100, overlong_buffer=50)
    assert out == pytest.approx([0.0, -0.5, -1.0])


def test_overlong_without_token_counts_says_what_is_missing():
    from grpo_mlx.rewards import overlong_reward

    with pytest.raises(ValueError, match="completion_lengths"):
        overlong_reward(["x"], [None])
    with pytest.raises(RewardError, match="completion_lengths"):
        get_reward("overlong")(["x"], [None])


def test_list_rewards_describes_every_builtin():
    listed = list_rewards()
    for name in BUILTINS:
        assert listed[name] and "\n" not in listed[name]


def test_unknown_reward_lists_known_names_and_plugin_forms():
    with pytest.raises(UserError, match="accuracy.*file.py:function.*module:function") as info:
        get_reward("acuracy")
    assert "\n" not in str(info.value)


def test_register_reward_adds_a_named_reward(monkeypatch):
    from grpo_mlx.rewards import registry

    monkeypatch.delitem(registry._REGISTRY, "test_constant", raising=False)  # undone after: the real registry stays

    @register_reward("test_constant")
    def constant(completions, answers, **fields):
        """Always 0.5 (a test)."""
        return [0.5] * len(completions)

    assert get_reward("test_constant")(["a", "b"], [None, None]) == [0.5, 0.5]
    assert list_rewards()["test_constant"] == "Always 0.5 (a test)."


# ---------------------------------------------------------------- plug-ins

PLUGIN = '''
def shout(completions, answers):
    return [float(c.isupper()) for c in completions]

def picky(completions, answers, **kwargs):
    for c in completions:
        if "boom" in c:
            raise RuntimeError("cannot score this")
    return [1.0] * len(completions)

def short(completions, answers, **kwargs):
    return [1.0]

def not_numbers(completions, answers, **kwargs):
    return ["high"] * len(completions)
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return path


def test_plugin_by_file_path(plugin_file):
    shout = get_reward(f"{plugin_file}:shout")
    # extra keyword arguments are dropped for a function that does not take them
    assert shout(["YES", "no"], [None, None], completion_lengths=[1, 2], a=[1, 2]) == [1.0, 0.0]


def test_plugin_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("grpo_test_plugin_mod:shout")(["A", "b"], [None, None]) == [1.0, 0.0]


def test_plugin_that_raises_names_itself_and_the_completion(plugin_file):
    spec = f"{plugin_file}:picky"
    with pytest.raises(RewardError) as info:
        get_reward(spec)(["fine", "this goes boom " + "x" * 100], [None, None])
    message = str(info.value)
    assert spec in message and "completion 1" in message and "this goes boom" in message
    assert "x" * 61 not in message  # the completion is cut to 60 characters
    assert isinstance(info.value, UserError)


def test_plugin_with_wrong_return_length_or_type_raises_reward_error(plugin_file):
    with pytest.raises(RewardError, match=r"short.*1 values for 2 completions"):
        get_reward(f"{plugin_file}:short")(["a", "b"], [None, None])
    with pytest.raises(RewardError, match=r"not_numbers.*'high'"):
        get_reward(f"{plugin_file}:not_numbers")(["a"], [None])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no/such/file.py:fn", "not found"),
        ("no_such_module_xyz:fn", "cannot import module"),
        ("{plugin}:missing", "no function 'missing'.*shout"),
    ],
)
def test_bad_plugin_raises_user_error_naming_it(spec, message, plugin_file):
    spec = spec.format(plugin=plugin_file)
    with pytest.raises(UserError, match=message) as info:
        get_reward(spec)
    assert spec in str(info.value) and not isinstance(info.value, RewardError)


def test_plugin_file_that_fails_to_import_raises_user_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def f(:\n")
    with pytest.raises(UserError, match=r"broken.py:f.*SyntaxError"):
        get_reward(f"{bad}:f")


def test_plugin_calling_sys_exit_is_a_reward_error_naming_it(tmp_path):
    # argparse or click inside a scoring helper call sys.exit(); SystemExit is no Exception.
    path = tmp_path / "exits.py"
    path.write_text("import sys\n"
                    "def quits(completions, answers, **kwargs):\n"
                    "    sys.exit(0)\n"
                    "def interrupted(completions, answers, **kwargs):\n"
                    "    raise KeyboardInterrupt\n")
    with pytest.raises(RewardError, match=r"quits.*completion 0.*sys.exit\(0\)"):
        get_reward(f"{path}:quits")(["a", "b"], [None, None])
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops at once
        get_reward(f"{path}:interrupted")(["a"], [None])


def test_plugin_file_calling_sys_exit_on_import_raises_user_error(tmp_path):
    path = tmp_path / "script.py"
    path.write_text("import sys\nsys.exit(3)\ndef f(completions, answers): return [1.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"script.py:f.*importing.*sys.exit\(3\)"):
        get_reward(f"{path}:f")


# ---------------------------------------------------------------- combining


def test_combine_rewards_weights_and_skips_none():
    columns = {"accuracy": [1.0, None, 0.0, None], "format": [0.5, 1.0, None, None]}
    rewards, applicable = combine_rewards(columns, {"accuracy": 2.0, "format": 0.5})
    assert rewards == [2.25, 0.5, 0.0, 0.0]
    assert applicable == [True, True, True, False]


def test_score_completions_passes_meta_fields_and_only_accepted_kwargs():
    seen = {}

    def uses_meta(completions, answers, a, completion_lengths):
        seen["a"], seen["lengths"] = a, completion_lengths
        return [float(x) for x in a]

    def plain(completions, answers):
        return [1.0] * len(completions)

    rewards, applicable, columns, _ = score_completions(
        {"uses_meta": uses_meta, "plain": plain, "accuracy": get_reward("accuracy")},
        {"uses_meta": 1.0, "plain": 0.5, "accuracy": 1.0},
        ["7", "8"],
        ["7", "7"],
        [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}],
        completion_lengths=[3, 4],
        group_size=2,
    )
    assert seen == {"a": [1, 2], "lengths": [3, 4]}
    assert columns == {"uses_meta": [1.0, 2.0], "plain": [1.0, 1.0], "accuracy": [1.0, 0.0]}
    assert rewards == [2.5, 2.5] and applicable == [True, True]


def test_score_completions_marks_rows_no_reward_applies_to():
    rewards, applicable, columns, _ = score_completions(
        {"accuracy": get_reward("accuracy")}, {"accuracy": 1.0}, ["7", "7"], ["7", None], [{}, {}]
    )
    assert rewards == [1.0, 0.0] and applicable == [True, False] and columns["accuracy"] == [1.0, None]


def test_every_builtin_runs_on_a_trainer_shaped_batch():
    """The kwargs the trainer passes reach every built-in without a TypeError."""
    names = list(BUILTINS)
    fns = {n: get_reward(n) for n in names}
    completions = ["<think>Step 1: 3+4</think><answer>7</answer>", "8"] * 2
    _, _, columns, _ = score_completions(
        fns, {}, completions, ["7"] * 4, [{"a": 1}] * 4,
        completion_lengths=[12, 1, 12, 1], group_size=2, max_completion_length=16,
    )
    assert all(len(col) == 4 for col in columns.values())

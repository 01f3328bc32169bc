"""Reward functions written for TRL run unchanged, and reward calls are bounded (--reward-timeout).

The TRL-style functions live in tests/trl_rewards.py; the classic form in tests/plugin_rewards.py.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from grpo_mlx.core.config import TrainConfig, build_config
from grpo_mlx.data.examples import load_examples
from grpo_mlx.core.errors import UserError
from grpo_mlx.rewards import (
    RewardError,
    RewardTimeoutError,
    calls_by_keyword,
    get_reward,
    score_completions,
    stop_reward_worker,
)
from grpo_mlx.train.sampling import score_groups
from test_reliability import CHILD, run_main

TESTS = Path(__file__).parent
TRL = TESTS / "trl_rewards.py"
CLASSIC = TESTS / "plugin_rewards.py"


def trl(name: str) -> str:
    return f"{TRL}:{name}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def score(examples, texts, rewards, steps=10, step=1, timeout=30.0, group_size=2):
    config = TrainConfig(group_size=group_size, steps=steps, max_tokens=64, reward_timeout=timeout)
    fns = {name: get_reward(name) for name in rewards}
    return score_groups(fns, {}, config, examples, texts, [len(t) for t in texts], step)


def children() -> list[tuple[int, str, str]]:
    """(pid, state, command line) of this process's child processes, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if int(ppid) == os.getpid():
            found.append((int(stat.parent.name), state, command))
    return found


def reward_workers() -> list[tuple[int, str, str]]:
    return [c for c in children() if "serve_reward_calls" in c[2]]


# ---------------------------------------------------------------- TRL's calling convention


def test_trl_rewards_get_prompts_columns_and_trainer_state_by_keyword(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is 3 plus 4?", "solution": "3 + 4 = \\boxed{7}", "level": "Level 1"},
        {"problem": "What is 10 minus 8, please?", "solution": "\\boxed{2}", "level": "Level 2"},
    ])
    examples = load_examples(str(data))
    texts = ["<think>\n3 plus 4\n</think>\n<answer>\n7\n</answer>", "the answer is 8",
             "<think>x</think><answer>2</answer>", "2"]
    names = [trl("prompt_length"), trl("accuracy_reward"), trl("format_reward"), trl("length_curriculum"),
             f"{CLASSIC}:text_length"]
    _, _, columns, timeouts = score(examples, texts, names, steps=10, step=3)
    # The bug this fixes: the prompts argument got the completions (len 44, 15, ...).
    assert columns[trl("prompt_length")] == [17.0, 17.0, 27.0, 27.0]
    # `solution`, a data set column, reaches the function under its own name, as read.
    assert columns[trl("accuracy_reward")] == [1.0, 0.0, 1.0, 1.0]
    assert columns[trl("format_reward")] == [1.0, 0.0, 0.0, 0.0]
    # Step 3 of 10: TRL's global_step counts the updates done before it, 2; the target is 10 + 40 * 0.2.
    assert columns[trl("length_curriculum")] == pytest.approx([-abs(len(t) - 18) / 50 for t in texts])
    assert columns[f"{CLASSIC}:text_length"] == [len(t) / 10 for t in texts]  # the classic form, unchanged
    assert set(timeouts.values()) == {0}


def test_a_reward_taking_prompts_gets_the_prompts(tmp_path):
    """The bug: TRL's `def f(prompts, completions, **kwargs)` got the completions as prompts, silently."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "What is 3 plus 4?", "answer": "7"}])
    _, _, columns, _ = score(load_examples(str(data)), ["seven", "it is 7"], [trl("prompt_length")])
    assert columns[trl("prompt_length")] == [17.0, 17.0]


def test_every_column_of_the_row_reaches_a_reward_by_name(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": 18, "source": "s1"}])
    seen = {}

    def keeps(prompts, completions, question, answer, source, answers, trainer_state, group_size, **kwargs):
        seen.update(prompts=prompts, question=question, answer=answer, source=source, answers=answers,
                    steps=(trainer_state.global_step, trainer_state.max_steps), group_size=group_size)
        return [0.0] * len(completions)

    config = TrainConfig(group_size=2, steps=5, max_tokens=8)
    score_groups({"keeps": keeps}, {}, config, load_examples(str(data)), ["a", "b"], [1, 1], 1)
    # answer: the column as read (a number); answers: our gold answer text.
    assert seen == {"prompts": ["Q?"] * 2, "question": ["Q?"] * 2, "answer": [18, 18], "source": ["s1"] * 2,
                    "answers": ["18", "18"], "steps": (0, 5), "group_size": 2}


def test_conversational_data_gets_completions_as_assistant_messages(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 plus 4?"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": chat, "answer": "7"}])
    texts = ["<think>\nadd\n</think>\n<answer>\n7\n</answer>", "8"]
    seen = {}

    def keeps(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    config = TrainConfig(group_size=2, steps=5, max_tokens=64)
    fns = {"keeps": keeps, **{name: get_reward(name) for name in
                              (trl("format_reward"), trl("prompt_length"), f"{CLASSIC}:text_length", "accuracy")}}
    _, _, columns, _ = score_groups(fns, {}, config, load_examples(str(data)), texts, [9, 1], 1)
    assert seen["prompts"] == [chat, chat]  # as TRL passes them: the data set's messages
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts]
    assert columns[trl("format_reward")] == [1.0, 0.0]  # open-r1's completion[0]["content"]
    assert columns[trl("prompt_length")] == [17.0, 17.0]
    assert columns[f"{CLASSIC}:text_length"] == [len(t) / 10 for t in texts]  # the classic form gets text
    assert columns["accuracy"] == [1.0, 0.0]  # built-ins read either form


def test_the_calling_rule_keeps_classic_plugins_working():
    offered = {"prompts": 1, "completions": 1, "answers": 1, "solution": 1, "trainer_state": 1}

    def trl_plain(completions, **kwargs): ...
    def trl_prompts(prompts, completions, **kwargs): ...
    def trl_solution(completions, solution, **kwargs): ...
    def trl_prompts_missing_column(prompts, completions, level): ...
    def classic(completions, answers, **fields): ...
    def classic_names(texts, golds): ...
    def classic_args(*args, **kwargs): ...
    def classic_positional_only(completions, answers, /): ...

    assert [calls_by_keyword(f, offered) for f in (trl_plain, trl_prompts, trl_solution, trl_prompts_missing_column)] == [True] * 4
    assert [calls_by_keyword(f, offered) for f in (classic, classic_names, classic_args, classic_positional_only)] == [False] * 4

    def golds_back(texts, golds):
        return [float(g) for g in golds]

    def prompts_back(prompts, completions):
        return [float(p) for p in prompts]

    _, _, columns, _ = score_completions({"golds_back": golds_back, "prompts_back": prompts_back}, {}, ["x", "y"], ["1", "2"],
                                         prompts=["3", "4"])
    assert columns == {"golds_back": [1.0, 2.0], "prompts_back": [3.0, 4.0]}
    with pytest.raises(RewardError, match=r"reward 'needs_level' failed .*missing 1 required positional argument: 'level'"):
        score_completions({"needs_level": trl_prompts_missing_column}, {}, ["x"], ["1"], prompts=["p"])


def test_train_with_trl_rewards_writes_their_columns_and_counts_timed_out_rows(tiny_model_dir, tmp_path):
    # One of the four prompts hangs the reward; it is not among the two tried before training.
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"question": "What is 1 plus 2?", "answer": "3"}, {"question": "What is 2 plus 2?", "answer": "4"},
        {"question": "HANG 5 plus 1?", "answer": "6"}, {"question": "What is 3 plus 4?", "answer": "7"},
    ])
    out = tmp_path / "run"
    rewards = [trl("format_reward"), trl("accuracy_reward"), trl("length_curriculum"), trl("hangs_on_marked_prompts")]
    marker = uuid.uuid4().hex  # every process the run starts inherits its environment
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output", str(out), "--steps", "2",
            "--batch-size", "2", "--group-size", "2", "--max-tokens", "4", "--reward", ",".join(rewards),
            "--reward-timeout", "1", "--seed", "3"]
    started = time.monotonic()
    result = subprocess.run(CHILD + args, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GRPO_TEST_MARKER": marker})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for name in rewards[:3]:
        assert all(f"rewards/{name}/mean" in row for row in rows), rows[0].keys()
    # One epoch of four prompts: the marked one's G = 2 rows scored None and counted, the run went on.
    assert sum(row.get(f"rewards/{rewards[3]}/timeouts", 0) for row in rows) == 2
    assert all(f"rewards/{rewards[3]}/mean" in row for row in rows)
    assert time.monotonic() - started < 120
    # No worker outlives the run: no process carries the run's environment.
    time.sleep(0.5)
    left = [p for p in Path("/proc").glob("[0-9]*/environ") if _holds(p, marker.encode())]
    assert left == [], left


def _holds(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:  # ended meanwhile, or not ours to read
        return False


# ---------------------------------------------------------------- timeouts


def test_rows_that_hang_score_none_and_are_counted_and_the_worker_is_reaped():
    prompts = ["p1", "p2", "HANG p3", "p4"]
    texts = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g", "hh"]
    name = trl("hangs_on_marked_prompts")
    started = time.monotonic()
    rewards, applicable, columns, timeouts = score_completions(
        {name: get_reward(name)}, {}, texts, [None] * 8, timeout=1.0, prompts=[p for p in prompts for _ in range(2)],
        group_size=2)
    # The batch, then group 3 alone, then its two rows alone: four timeouts of 1 s.
    assert time.monotonic() - started < 10
    assert columns[name] == [0.1, 0.2, 0.3, 0.4, None, None, 0.1, 0.2]
    assert timeouts == {name: 2} and applicable == [True] * 4 + [False] * 2 + [True] * 2
    # Each cut-off worker was killed and reaped: no zombie, no call still hanging.
    assert [c for c in children() if c[1] == "Z"] == []
    assert len(reward_workers()) <= 1  # at most the fresh one that scored the last rows
    stop_reward_worker()
    assert reward_workers() == []


def test_a_slow_call_is_cut_off_at_the_timeout_not_when_it_returns(tmp_path):
    """A reward that would return (a valid value) after 8 s, under a 0.5 s timeout: the batch call and
    the row alone are both cut off at the timeout, well before the reward would have answered."""
    plugin = tmp_path / "slow.py"
    plugin.write_text("import time\n\ndef slow(completions, **kwargs):\n    time.sleep(8)\n"
                      "    return [1.0] * len(completions)\n")
    name = f"{plugin}:slow"
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="every one of its 1 completions"):
        score_completions({name: get_reward(name)}, {}, ["a"], [None], timeout=0.5)
    assert time.monotonic() - started < 6  # two 0.5 s calls and two worker starts; the reward alone takes 8 s
    assert reward_workers() == []


def test_a_reward_that_hangs_on_every_row_is_an_error_naming_it():
    name = trl("always_hangs")
    with pytest.raises(RewardTimeoutError) as error:
        score_completions({name: get_reward(name)}, {}, ["first text", "b"], [None, None], timeout=0.5, group_size=2)
    message = str(error.value)
    assert "always_hangs" in message and "every one of its 2 completions" in message and "'first text'" in message
    assert "\n" not in message
    assert reward_workers() == [] and [c for c in children() if c[1] == "Z"] == []


def test_a_reward_whose_worker_dies_is_a_reward_failure(tmp_path):
    plugin = tmp_path / "quits.py"
    plugin.write_text("import os\n\ndef quits(completions, **kwargs):\n    os._exit(3)\n")
    with pytest.raises(RewardError, match=r"quits.*worker process died \(exit status 3\)"):
        score_completions({f"{plugin}:quits": get_reward(f"{plugin}:quits")}, {}, ["a"], [None], timeout=5.0)
    assert reward_workers() == []


def test_train_stops_with_one_line_when_a_reward_times_out_on_every_row(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "3", "--batch-size", "1",
            "--group-size", "2", "--max-tokens", "4", "--reward", trl("hangs_after_first_step"),
            "--reward-timeout", "1", "--save-every", "1"]
    assert run_main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: reward plug-in") and "hangs_after_first_step" in line and "timed out" in line, line
    assert "at step 2, example 'What is" in line and "saved step 1" in line, line
    assert reward_workers() == [] and [c for c in children() if c[1] == "Z"] == []


def test_a_reward_that_hangs_on_the_trial_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    started = time.monotonic()
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--reward", trl("always_hangs"),
            "--reward-timeout", "1"]
    assert run_main(args) == 2
    line = capsys.readouterr().err.strip()
    assert "always_hangs" in line and "timed out" in line and "trial call" in line and "\n" not in line, line
    assert time.monotonic() - started < 20


def test_reward_timeout_must_be_positive():
    assert build_config({"reward_timeout": "2.5"}).reward_timeout == 2.5
    with pytest.raises(UserError, match=r"reward_timeout=0.0: must be > 0"):
        build_config({"reward_timeout": 0})


def test_the_worker_starts_in_well_under_a_second_and_calls_cost_little():
    name = trl("format_reward")
    fn = {name: get_reward(name)}
    stop_reward_worker()
    started = time.perf_counter()
    score_completions(fn, {}, ["x"] * 32, [None] * 32, timeout=5.0)
    assert time.perf_counter() - started < 5  # measured ~0.16 s on 2 cores
    started = time.perf_counter()
    for _ in range(20):
        score_completions(fn, {}, ["x"] * 32, [None] * 32, timeout=5.0)
    assert (time.perf_counter() - started) / 20 < 0.1  # measured ~0.5 ms
    assert len(reward_workers()) == 1  # one worker served every call
    stop_reward_worker()


if sys.platform != "linux":  # the /proc checks above
    pytestmark = pytest.mark.skip("reads /proc")

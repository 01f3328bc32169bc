"""`grpo-mlx eval` and `grpo-mlx rewards`: accuracy by hand, pass@k by brute force, maj@K by hand."""

import io
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.rewards.answers import to_number
from grpo_mlx.cli import main
from grpo_mlx.core.config import EvalConfig
from grpo_mlx.data.examples import arithmetic_examples
from grpo_mlx.data.prompts import render_prompt
from grpo_mlx.core.errors import UserError
from grpo_mlx.eval.evaluate import EvalProgress, evaluate, k_values, majority_vote, pass_at_k
from grpo_mlx.rewards import accuracy_reward, list_rewards

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"question": ex.prompt, "answer": ex.answer}) + "\n" for ex in examples))
    return path


@pytest.fixture(scope="module")
def arithmetic_file(tmp_path_factory):
    # Operands 0..99 give prompts of different token lengths, so batches mix padded rows.
    return write_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl", arithmetic_examples(24, seed=77))


def greedy_by_hand(model, tokenizer, examples, max_tokens):
    """One mlx_lm.generate call per prompt, no batching: the reference eval must match."""
    from mlx_lm import generate

    from grpo_mlx.rollout.batch import make_sampler

    texts = [generate(model, tokenizer, render_prompt(tokenizer, ex), max_tokens=max_tokens, sampler=make_sampler(0.0))
             for ex in examples]
    return texts, [score == 1.0 for score in accuracy_reward(texts, [ex.answer for ex in examples])]


# ---------------------------------------------------------------- greedy accuracy


def test_greedy_accuracy_equals_generating_each_prompt_by_hand(arithmetic_file):
    from grpo_mlx.model.policy import load_model

    result = evaluate(EvalConfig(dataset=str(arithmetic_file), batch_size=5))  # 5 does not divide 24: a ragged last batch
    model, tokenizer, _ = load_model(None)
    examples = arithmetic_examples(24, seed=77)
    texts, correct = greedy_by_hand(model, tokenizer, examples, max_tokens=8)

    assert [r["completion"] for r in result["examples"]] == texts
    assert [r["correct"] for r in result["examples"]] == correct
    assert result["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert 0 < result["accuracy"] < 1  # the demo model gets some right and some wrong
    assert [r["gold"] for r in result["examples"]] == [ex.answer for ex in examples]
    assert result["settings"]["max_tokens"] == 8  # the demo model's default


def test_adapters_from_the_run_directory_are_applied(arithmetic_file, tmp_path):
    from grpo_mlx.model.fuse import load_with_adapters
    from grpo_mlx.model.policy import attach_adapters, load_model, save_adapters

    model, _, _ = load_model(None)
    adapter_config = attach_adapters(model, rank=4, num_layers=-1, scale=20.0)
    mx.random.seed(5)
    _perturb_lora_b(model, 0.02)  # trained adapters are nonzero; fresh ones (B = 0) would change nothing
    save_adapters(model, tmp_path / "run", adapter_config)

    base = evaluate(EvalConfig(dataset=str(arithmetic_file), limit=12))
    tuned = evaluate(EvalConfig(dataset=str(arithmetic_file), limit=12, adapter_path=str(tmp_path / "run")))
    model_with, tokenizer, _ = load_with_adapters(None, tmp_path / "run")
    texts, correct = greedy_by_hand(model_with, tokenizer, arithmetic_examples(12, seed=77), max_tokens=8)

    assert [r["completion"] for r in tuned["examples"]] == texts
    assert [r["correct"] for r in tuned["examples"]] == correct
    assert [r["completion"] for r in base["examples"]] != texts  # the adapters changed something


def test_adapters_without_model_load_the_base_they_were_trained_on(tiny_model_dir, arithmetic_file, tmp_path):
    from grpo_mlx.model.policy import attach_adapters, load_model, save_adapters

    model, _, _ = load_model(str(tiny_model_dir))
    adapter_config = attach_adapters(model, rank=4, num_layers=-1, scale=20.0)
    save_adapters(model, tmp_path / "run", {**adapter_config, "model": str(tiny_model_dir)})
    # The demo base has other shapes: loading these adapters onto it would fail.
    result = evaluate(EvalConfig(dataset=str(arithmetic_file), limit=2, max_tokens=3, adapter_path=str(tmp_path / "run")))
    assert result["settings"]["model"] == str(tiny_model_dir)
    assert result["settings"]["adapter_path"] == str(tmp_path / "run")


def _perturb_lora_b(model, std):
    from mlx.utils import tree_flatten, tree_unflatten

    noisy = [(k, std * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.update(tree_unflatten(noisy))
    mx.eval(model.parameters())


def test_gsm8k_gold_solutions_are_reduced_to_their_final_number(tiny_model_dir):
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip("GSM8K data not present")
    # Not the demo model: its 256 positions are too few for some GSM8K questions, which eval skips.
    result = evaluate(EvalConfig(model=str(tiny_model_dir), dataset=str(GSM8K / "test.jsonl"), limit=3, max_tokens=2))
    assert [r["gold_answer"] for r in result["examples"]] == ["18", "3", "70000"]
    for r in result["examples"]:  # scored against the final number, not the whole solution text
        assert r["correct"] == (r["extracted"] is not None and to_number(r["extracted"]) == to_number(r["gold_answer"]))


# ---------------------------------------------------------------- pass@k and maj@K


def pass_at_k_by_enumeration(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 2, 1), (5, 2, 3), (5, 2, 4),
                                   (6, 1, 6), (8, 3, 2), (10, 4, 5), (12, 11, 1), (12, 1, 7)])
def test_pass_at_k_equals_enumerating_subsets(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(pass_at_k_by_enumeration(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(200, 3, 1), (200, 3, 10), (200, 37, 100), (1000, 1, 500), (64, 60, 8)])
def test_pass_at_k_equals_the_binomial_formula_for_large_n(n, c, k):
    reference = 1.0 - float(Fraction(math.comb(n - c, k), math.comb(n, k)))
    assert pass_at_k(n, c, k) == pytest.approx(reference, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_k_values_are_powers_of_two_then_k():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(10) == [1, 2, 4, 8, 10]
    assert k_values(3) == [1, 2, 3]


@pytest.mark.parametrize("answers,winner", [
    (["12", "12", "7"], 0),
    (["7", "12", "12"], 1),  # the largest group wins even when it appears later
    (["7", "12", "12", "7"], 0),  # a tie goes to the answer that appeared first
    (["12", "7", "7", "12"], 0),
    (["5", "1,000", "1000.0", "$1000"], 1),  # equal by value
    (["0.5", "1/2", "3"], 0),
    (["Paris", "paris.", "London"], 0),  # text answers compare normalised
    ([None, None, "3"], 2),  # no answer casts no vote
    ([None, None], None),
    ([], None),
])
def test_majority_vote_on_hand_built_cases(answers, winner):
    assert majority_vote(answers) == winner


def test_sampled_metrics_agree_with_the_per_example_records(arithmetic_file):
    result = evaluate(EvalConfig(dataset=str(arithmetic_file), limit=10, samples=4, seed=3, batch_size=4))
    records = result["examples"]
    for r in records:
        flags = [score == 1.0 for score in accuracy_reward(r["samples"], [r["gold"]] * 4)]
        assert r["sample_correct"] == flags
        winner = majority_vote(r["sample_answers"])
        assert r["majority_correct"] == (winner is not None and flags[winner])
    for k in (1, 2, 4):
        expected = np.mean([pass_at_k(4, sum(r["sample_correct"]), k) for r in records])
        assert result[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert result["maj@4"] == pytest.approx(np.mean([r["majority_correct"] for r in records]))
    assert result["pass@1"] <= result["pass@2"] <= result["pass@4"]
    assert 0 < result["pass@4"]  # some sample is right somewhere, so the check above has teeth


def test_maj_at_k_scores_the_winning_answer_not_the_first_sample(tiny_model_dir, monkeypatch):
    """Scripted completions (decode_all replaced), scored by hand: in the first problem the first sample
    is wrong and the majority right, in the third the first sample gives no answer and the majority is
    wrong, so reading the first sample's flag instead of the winner's changes maj@4."""
    from types import SimpleNamespace

    import grpo_mlx.eval.evaluate as evaluate_module
    from grpo_mlx.data.examples import Example
    from grpo_mlx.model.policy import load_config_and_tokenizer

    examples = [Example(prompt="What is 5 + 7?", answer="12"), Example(prompt="What is 1 + 2?", answer="3"),
                Example(prompt="What is 4 + 5?", answer="9")]
    greedy = ["12", "It is 4.", "9"]
    sampled = [["7", "It is 12.", "12.0", "5"],
               ["3", "#### 3", "4", "no idea"],
               ["no idea", "8", "It is 8.", "9"]]

    def scripted(model, tokenizer, prompts, group_size, *args, **kwargs):
        assert len(prompts) == len(examples)
        texts = greedy if group_size == 1 else [t for row in sampled for t in row]
        return SimpleNamespace(texts=texts, finish_reasons=["stop"] * len(texts), multi_turn=False)

    monkeypatch.setattr(evaluate_module, "decode_all", scripted)
    _, tokenizer = load_config_and_tokenizer(str(tiny_model_dir))
    result = evaluate_module.evaluate_examples(None, tokenizer, examples, samples=4)

    correct = [[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]  # by hand: which samples give the gold answer
    majority = [True, True, False]  # 12 (2 votes of 3 answers), 3 (2 of 3), 8 (2 of 3; 9 has 1)
    assert [r["sample_correct"] for r in result["examples"]] == [[bool(c) for c in row] for row in correct]
    assert [r["majority_answer"] for r in result["examples"]] == ["12", "3", "8"]
    assert [r["majority_correct"] for r in result["examples"]] == majority
    assert result["maj@4"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    for k in (1, 2, 4):  # 1 - C(n - c, k) / C(n, k), averaged over the problems
        expected = np.mean([1 - math.comb(4 - sum(row), k) / math.comb(4, k) for row in correct])
        assert result[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)


def test_sampling_is_deterministic_under_the_seed(arithmetic_file):
    run = lambda seed: [r["samples"] for r in evaluate(EvalConfig(dataset=str(arithmetic_file), limit=6, samples=4,  # noqa: E731
                                                                  seed=seed, batch_size=3))["examples"]]
    first = run(1)
    assert run(1) == first
    assert run(2) != first


# ---------------------------------------------------------------- CLI and errors


def test_cli_eval_writes_json_with_top_level_accuracy(arithmetic_file, tmp_path, capsys):
    out = tmp_path / "nested" / "result.json"
    main(["eval", "--dataset", str(arithmetic_file), "--limit", "6", "--samples", "2", "--output", str(out)])
    result = json.loads(out.read_text())
    assert 0 <= result["accuracy"] <= 1
    assert result["accuracy"] == sum(r["correct"] for r in result["examples"]) / 6
    assert {"pass@1", "pass@2", "maj@2"} <= set(result)
    assert result["settings"]["samples"] == 2 and result["settings"]["dataset"] == str(arithmetic_file)
    assert {"prompt", "gold", "completion", "extracted", "correct", "samples", "sample_answers"} <= set(result["examples"][0])
    stdout = capsys.readouterr().out
    assert "accuracy (greedy)" in stdout and "maj@2" in stdout and str(out) in stdout


def test_cli_rewards_lists_every_built_in(capsys):
    main(["rewards"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(("Pass", "Your", "fn("))]
    assert listed == list(list_rewards())
    assert "accuracy" in listed and "format" in listed
    assert "file.py:fn" in out and "module:fn" in out


def test_missing_dataset_file_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--dataset", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("error:")


def test_data_without_gold_answers_is_refused(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "What is 1 plus 1?"}) + "\n")
    with pytest.raises(UserError, match="--answer-field"):
        evaluate(EvalConfig(dataset=str(path)))


@pytest.mark.parametrize("settings,field", [({"samples": 0}, "samples"), ({"samples": 4, "temperature": 0.0}, "temperature"),
                                            ({"batch_size": 0}, "batch_size"), ({"top_p": 0.0}, "top_p"),
                                            ({"limit": 0}, "limit"), ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"),
                                            ({"temperature": -1.0}, "temperature"), ({"split": " "}, "split")])
def test_bad_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(UserError, match=rf"invalid config value {field}="):
        evaluate(EvalConfig(**settings))


@pytest.mark.parametrize("flags,expected", [(["--top-k", "-1"], "top_k=-1"), (["--min-p", "2"], "min_p=2.0"),
                                            (["--samples", "0"], "samples=0"), (["--limit", "x"], "'--limit': 'x' is not a valid integer")])
def test_bad_eval_flags_are_one_error_line_before_anything_loads(flags, expected, capsys, monkeypatch):
    import grpo_mlx.eval.evaluate

    monkeypatch.setattr(grpo_mlx.eval.evaluate, "load_with_adapters", lambda *a: pytest.fail("loaded a model"), raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_eval_top_k_and_min_p_reach_the_sampler(arithmetic_file, monkeypatch):
    import grpo_mlx.rollout.batch

    seen = []
    real = grpo_mlx.rollout.batch.make_sampler
    monkeypatch.setattr(grpo_mlx.rollout.batch, "make_sampler", lambda *args: seen.append(args) or real(*args))
    main(["eval", "--dataset", str(arithmetic_file), "--limit", "2", "--samples", "2", "--top-k", "3", "--min-p", "0.1",
          "--temperature", "0.7"])
    assert (0.7, 1.0, 3, 0.1) in seen  # the K samples' sampler; greedy uses make_sampler(0.0)


def test_eval_reads_a_config_file_under_its_flags(arithmetic_file, tmp_path):
    path = tmp_path / "eval.yaml"
    out = tmp_path / "result.json"
    path.write_text(f"dataset: {arithmetic_file}\nlimit: 3\nsamples: 2\ntop_k: 2\noutput: {out}\n")
    main(["eval", "--config", str(path), "--limit", "2"])
    settings = json.loads(out.read_text())["settings"]
    assert (settings["limit"], settings["samples"], settings["top_k"], settings["dataset"]) == (2, 2, 2, str(arithmetic_file))


def test_generate_takes_the_sampling_flags(capsys, monkeypatch):
    import grpo_mlx.rollout.batch

    seen = []
    real = grpo_mlx.rollout.batch.make_sampler
    monkeypatch.setattr(grpo_mlx.rollout.batch, "make_sampler", lambda *args: seen.append(args) or real(*args))
    args = ["generate", "--prompt", "What is 1 plus 2?", "--max-tokens", "4", "--temperature", "0.5", "--top-k", "5",
            "--min-p", "0.05", "--top-p", "0.9", "--seed", "7"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first  # seeded: the same sample again
    assert seen == [(0.5, 0.9, 5, 0.05)] * 2


@pytest.mark.parametrize("flags,expected", [(["--top-k", "-2"], "top_k=-2"), (["--temperature", "-1"], "temperature=-1.0"),
                                            ([], "Missing option '--prompt'")])
def test_bad_generate_flags_are_one_error_line(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *flags] + ([] if not flags else ["--prompt", "hi"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_plain_progress_off_a_terminal_counts_every_prompt():
    from rich.console import Console

    stream = io.StringIO()
    progress = EvalProgress(Console(file=stream, force_terminal=False))
    progress.start(10)
    for phase, n in [("greedy", 4), ("greedy", 1), ("sampled", 4), ("sampled", 1)]:
        progress.advance(phase, n)
    progress.stop()
    lines = stream.getvalue().splitlines()
    assert progress.plain and lines[0] == "eval greedy 4/10 prompts" and lines[-1] == "eval sampled 10/10 prompts"


def test_output_under_a_file_is_refused_before_the_evaluation_runs(tmp_path, capsys, monkeypatch):
    import grpo_mlx.eval.evaluate

    calls = []
    monkeypatch.setattr(grpo_mlx.eval.evaluate, "evaluate", lambda **settings: calls.append(settings) or pytest.fail("evaluated"))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--limit", "2", "--output", str(blocker / "sub" / "result.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(blocker) in err[0]
    assert calls == []  # refused before any model loaded or prompt decoded
    assert blocker.read_text() == "a file, not a folder\n"


def test_output_replaces_only_an_earlier_eval_result(tmp_path, capsys, monkeypatch):
    import grpo_mlx.eval.evaluate

    calls = []
    monkeypatch.setattr(grpo_mlx.eval.evaluate, "evaluate", lambda *a, **k: calls.append(1) or pytest.fail("evaluated"))
    users_file = tmp_path / "adapters.safetensors"
    users_file.write_bytes(b"trained weights")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--limit", "2", "--output", str(users_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not an earlier eval result" in err[0]
    assert calls == [] and users_file.read_bytes() == b"trained weights"
    earlier = tmp_path / "result.json"
    grpo_mlx.eval.evaluate.write_result({"accuracy": 0.5, "settings": {}}, earlier)
    assert grpo_mlx.eval.evaluate.check_result_path(earlier) == earlier  # its own result may be replaced

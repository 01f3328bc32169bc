"""Data-parallel GRPO: 2 ranks on this machine through `mlx.launch -n 2 --backend ring` (loopback).

Sampling cannot match across rank counts: mlx-lm's batch generator draws the noise for all N
rows of a batch at once, so a rank decoding half the rows draws different numbers even from
the same seed. The 1-rank vs 2-rank comparisons therefore feed both runs the same fixed
completions (`Run.rollout_fn`), which depend only on the prompt; everything after sampling
(rewards, advantages, losses, gradients, updates) is then deterministic.

This file is also the worker the ranks run: `python tests/test_distributed.py worker ...`.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
BIN = Path(sys.executable).parent

# name -> config overrides; each runs STEPS steps with fixed completions.
CASES = {
    "grpo": dict(loss_type="grpo", beta=0.04),
    "dapo_mu2_micro": dict(loss_type="dapo", beta=0.0, num_iterations=2, micro_batch_size=3, max_grad_norm=0.05),
    "dr_grpo_k1": dict(loss_type="dr_grpo", beta=0.1, kl_estimator="k1"),
    "bnpo": dict(loss_type="bnpo", beta=0.04),
    # Zero-variance groups dropped, more prompts drawn: the ranks split each round's shortfall.
    "dynamic_sampling": dict(loss_type="dapo", dynamic_sampling=True, max_sampling_rounds=2),
    # Rank 1 never finds an informative group: it must still join every update (zero gradients).
    "rank1_finds_none": dict(loss_type="grpo", dynamic_sampling=True, max_sampling_rounds=1),
}
ONE_RANK_EQUIVALENT = ("grpo", "dapo_mu2_micro", "dr_grpo_k1", "dynamic_sampling")  # bnpo: per-rank token means
STEPS = 3
# Shown metrics that must equal the 1-rank run's (timings and throughputs are rank 0's own).
COMPARED = ("sampling_rounds", "num_groups", "reward", "reward_std", "frac_reward_zero_std", "rewards/text_length/mean", "rewards/text_length/std",
            "completions/mean_length", "completions/max_length", "completions/clipped_ratio",
            "loss", "grad_norm", "kl", "entropy", "ratio/mean", "clip_ratio/region_mean", "learning_rate")


def case_config(model_dir, output, **overrides):
    from grpo_mlx.core.config import build_config

    values = dict(
        model=str(model_dir), dataset="arithmetic", steps=STEPS, batch_size=4, group_size=4, max_tokens=8,
        learning_rate=2e-2, lora_rank=4, lora_layers=-1, output=str(output), seed=5, reward=[TEXT_REWARD],
    )
    values.update(overrides)
    return build_config({}, values)


def fixed_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
    """G completions per prompt that depend on the prompt alone: the same on any rank, in any batch.

    A third of the prompts get G copies of one completion: a zero-variance group.
    """
    from grpo_mlx.rollout.batch import Rollout

    eos = sorted(tokenizer.eos_token_ids)
    rows, completions, finish = [], [], []
    for prompt in prompts:
        seed = zlib.crc32(np.asarray(prompt, dtype=np.int32).tobytes())
        rng = np.random.default_rng(seed)
        for _ in range(group_size):
            if seed % 3 == 0:  # restart the stream: every completion the same
                rng = np.random.default_rng(seed)
            length = int(rng.integers(1, max_tokens + 1))
            tokens = [int(t) for t in rng.integers(20, model.args.vocab_size, size=length) if t not in eos]
            stops = length < max_tokens
            rows.append(list(prompt))
            completions.append(tokens[: max_tokens - 1] + eos[:1] if stops else tokens)
            finish.append("stop" if stops else "length")
    texts = [tokenizer.decode([t for t in c if t not in eos]) for c in completions]
    return Rollout(rows, completions, texts, finish, group_size)


def rank1_uniform_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
    """Fixed completions, but on rank 1 every group is G copies of one completion."""
    from grpo_mlx.train.distributed import world
    from grpo_mlx.rollout.batch import Rollout

    rollout = fixed_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler)
    if world().rank() != 1:
        return rollout
    firsts = [g * group_size for g in range(len(prompts)) for _ in range(group_size)]
    pick = lambda xs: [xs[i] for i in firsts]  # noqa: E731
    return Rollout(rollout.prompt_tokens, pick(rollout.completion_tokens), pick(rollout.texts),
                   pick(rollout.finish_reasons), group_size)


def adapters(run) -> dict:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}


def train_fixed(config, steps=None, sgd=True, rollout_fn=fixed_rollout):
    """Train with fixed completions; returns (run, per-step metrics).

    `sgd`: plain SGD instead of AdamW for the 1-rank vs 2-rank comparison. Adam's
    first updates are lr * g / |g|: an element whose gradient is rounding noise
    (1e-9) moves by a full lr either way, so summing a gradient in another order
    can flip it. SGD's update is linear in the gradient and keeps float32
    differences at float32 size.
    """
    import mlx.optimizers as optim

    from grpo_mlx.train.trainer import setup, train

    run = setup(config if steps is None else dataclasses.replace(config, steps=steps))
    run.rollout_fn = rollout_fn
    if sgd:
        run.optimizer = optim.SGD(learning_rate=config.learning_rate)
    return run, [m for m, _ in train(run)]


# ---------------------------------------------------------------- the worker each rank runs


def worker(model_dir: str, out_dir: str) -> None:
    """Train every case and a resumed run; write each rank's adapters and metrics to out_dir."""
    from grpo_mlx.train.distributed import world
    from grpo_mlx.train.runner import resume, save
    from grpo_mlx.train.trainer import setup, train

    out, rank = Path(out_dir), world().rank()
    for name, overrides in CASES.items():
        rollout_fn = rank1_uniform_rollout if name == "rank1_finds_none" else fixed_rollout
        run, metrics = train_fixed(case_config(model_dir, out / "unused", **overrides), rollout_fn=rollout_fn)
        np.savez(out / f"{name}-rank{rank}.npz", **adapters(run))
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(metrics))

    # Stop after 2 steps (rank 0 saves), resume in a fresh run, do the third.
    config = case_config(model_dir, out / "resumed", **CASES["grpo"])
    run, _ = train_fixed(config, steps=2, sgd=False)  # AdamW: its state must reach every rank too
    save(run, out / "resumed")
    run = setup(case_config(model_dir, out / "resumed", **CASES["grpo"]))
    run.rollout_fn = fixed_rollout
    resume(run, out / "resumed")
    state = {"step": run.step, "data_position": run.data_position}
    list(train(run))
    np.savez(out / f"resumed-rank{rank}.npz", **adapters(run))
    run, _ = train_fixed(config, sgd=False)
    np.savez(out / f"straight-rank{rank}.npz", **adapters(run))
    (out / f"resumed-rank{rank}.json").write_text(json.dumps(state))


# ---------------------------------------------------------------- reward plug-ins that fail on rank 1

_reward_calls = 0


def _rank1_fails_from_step_2(completions, fail):
    """Score like text_length; on rank 1, from step 2 on, `fail()` instead.

    The ranks call a reward once before training (a trial on the gold answers) and once
    per step, so the third call is step 2's: step 1 finishes, and rank 0 has it to save.
    """
    global _reward_calls
    _reward_calls += 1
    if os.environ.get("MLX_RANK") == "1" and _reward_calls >= 3:
        fail()
    return [len(c) / 10 for c in completions]


def raises_on_rank_1(completions, answers, **example_fields):
    def fail():
        raise ValueError("rank 1 cannot score this")
    return _rank1_fails_from_step_2(completions, fail)


def kills_rank_1(completions, answers, **example_fields):
    """A crash no Python code sees: rank 1's process dies at once (rewards run in a worker process
    of the rank's: its parent)."""
    return _rank1_fails_from_step_2(completions, lambda: os.kill(os.getppid(), signal.SIGKILL))


# ---------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], cwd, timeout=120, expect_success=True) -> subprocess.CompletedProcess:
    """Run `command` as 2 ranks on 127.0.0.1 over MLX's ring backend; a hang fails the test."""
    port = free_port()  # the ring uses port and port + 1
    args = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--", *command]
    # A session of its own: on a timeout the ranks die with the launcher.
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2 ranks still running after {timeout} s: {stdout[-2000:]} {stderr[-2000:]}")
    # mlx.launch exits 0 even when a rank fails; it only prints a warning.
    failed = proc.returncode != 0 or "exited with code" in stdout + stderr or "was killed" in stdout + stderr
    assert failed != expect_success, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_rank_results(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    launch([sys.executable, __file__, "worker", str(tiny_model_dir), str(out)], cwd=out)
    return out


def load(out, name, rank):
    return dict(np.load(out / f"{name}-rank{rank}.npz")), json.loads((out / f"{name}-rank{rank}.json").read_text())


# ---------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_end_with_identical_adapters(two_rank_results, name):
    (a0, m0), (a1, m1) = load(two_rank_results, name, 0), load(two_rank_results, name, 1)
    assert a0.keys() == a1.keys() and len(a0) > 0
    for key in a0:
        np.testing.assert_array_equal(a0[key], a1[key], err_msg=key)
    # The adapters moved: the ranks agree on a trained state, not on the initial one.
    assert max(np.abs(v).max() for k, v in a0.items() if k.endswith("lora_b")) > 0
    for s0, s1 in zip(m0, m1):  # reduced metrics are the same on every rank
        assert {k: s0[k] for k in COMPARED if k in s0} == {k: s1[k] for k in COMPARED if k in s1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_RANK_EQUIVALENT)
def test_two_ranks_match_one_rank(two_rank_results, tiny_model_dir, tmp_path, name):
    run, one_rank_metrics = train_fixed(case_config(tiny_model_dir, tmp_path / "run", **CASES[name]))
    two_rank_adapters, two_rank_metrics = load(two_rank_results, name, 0)
    for key, value in adapters(run).items():
        np.testing.assert_allclose(two_rank_adapters[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert len(one_rank_metrics) == len(two_rank_metrics) == STEPS
    for one, two in zip(one_rank_metrics, two_rank_metrics):
        for key in COMPARED:
            assert (key in one) == (key in two), key
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)


@pytest.mark.slow
def test_two_rank_resume_continues_like_an_uninterrupted_run(two_rank_results):
    (resumed0, state0), (resumed1, state1) = load(two_rank_results, "resumed", 0), load(two_rank_results, "resumed", 1)
    straight = dict(np.load(two_rank_results / "straight-rank0.npz"))
    # Rank 1 never reads the run directory: it got step, data position and weights from rank 0.
    assert state0 == state1 == {"step": 2, "data_position": 2 * 4}
    for key in straight:
        np.testing.assert_array_equal(resumed0[key], resumed1[key], err_msg=key)
        np.testing.assert_allclose(resumed0[key], straight[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_grpo_mlx_train_on_two_ranks_writes_one_run(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    train = [str(BIN / "grpo-mlx"), "train", "--model", str(tiny_model_dir), "--output", str(run_dir),
             "--batch-size", "2", "--group-size", "4", "--max-tokens", "6", "--reward", TEXT_REWARD, "--seed", "1"]
    first = launch(train + ["--steps", "2"], cwd=tmp_path)
    # Rank 0 alone draws the dashboard and writes the run: one line per step, one final message.
    assert first.stdout.count("adapters saved to") == 1, first.stdout
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    second = launch(train + ["--steps", "3", "--resume"], cwd=tmp_path)
    assert "resumed from step-000002" in second.stdout
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 3 * 2
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def rank_exits(output: str) -> dict:
    """Each rank's end as mlx.launch reports it: its exit status, or "killed" (by the launcher)."""
    ends = {}
    for rank in (0, 1):
        found = re.search(rf"Node with rank {rank} (?:exited with code (-?\d+)|(was killed))", output)
        ends[rank] = None if found is None else "killed" if found.group(2) else int(found.group(1))
    return ends


def two_rank_train(tiny_model_dir, run_dir, reward):
    return [str(BIN / "grpo-mlx"), "train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "3",
            "--batch-size", "2", "--group-size", "2", "--max-tokens", "4", "--reward", f"{__file__}:{reward}", "--seed", "1"]


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_every_rank_with_its_reason(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(two_rank_train(tiny_model_dir, run_dir, "raises_on_rank_1"), cwd=tmp_path, timeout=90, expect_success=False)
    output = result.stdout + result.stderr
    # Every rank stops with the user-error status, unless mlx.launch, which stops the other
    # ranks once one has exited, gets to it first: both are past saving by then, and the
    # first to exit is either rank.
    ends = rank_exits(output)
    assert all(end in (2, -signal.SIGTERM, "killed") for end in ends.values()) and 2 in ends.values(), output[-3000:]
    # Each rank's one-line error names the failing rank and its reason; rank 1 prints its
    # only once rank 0 has saved step 1, the last step every rank finished.
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2, output[-3000:]
    assert all(e.startswith("error: rank 1: ") and "rank 1 cannot score this" in e and "at step 2" in e for e in errors), errors
    assert all(f"saved step 1 to {run_dir}" in e for e in errors), errors
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"]


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_without_a_hang(tiny_model_dir, tmp_path):
    result = launch(two_rank_train(tiny_model_dir, tmp_path / "run", "kills_rank_1"), cwd=tmp_path, timeout=90, expect_success=False)
    output = result.stdout + result.stderr
    ends = rank_exits(output)
    # Rank 1 died of SIGKILL; rank 0 did not finish as if nothing happened, nor wait forever.
    assert ends[1] == -signal.SIGKILL and ends[0] not in (None, 0), output[-3000:]


def test_batch_that_does_not_split_across_ranks_is_a_user_error():
    from grpo_mlx.train.distributed import local_batch_size
    from grpo_mlx.core.errors import UserError

    assert local_batch_size(8, 4) == 2
    with pytest.raises(UserError, match="multiple of 4"):
        local_batch_size(6, 4)


def test_bnpo_is_the_mean_over_ranks_of_each_ranks_token_mean(tiny_model_dir, tmp_path, monkeypatch):
    """bnpo divides by this rank's completion tokens times the ranks that have rows, so the summed
    gradient is the mean over those ranks of each one's token-mean loss. One process here, a second
    rank with rows simulated in the count sum. mu = 1, beta = 0: ratio 1, so this rank's loss is
    -sum_i A_i * length_i / (its tokens) / 2, in float64 here."""
    import grpo_mlx.train.trainer as trainer
    from grpo_mlx.train import distributed
    from test_grpo import ref_advantages

    class OneMoreRank:
        def __getattr__(self, name):
            return getattr(distributed, name)

        def sum_across(self, values):  # [rows, completion tokens, has rows] of each rank
            return distributed.sum_across(values) + np.array([16.0, 77.0, 1.0])

    seen, real_update_policy = [], trainer.update_policy

    def recording_update_policy(run, rollout, rewards, applicable, tokens, completion_mask, normaliser):
        seen.append((list(rewards), np.array(completion_mask, dtype=np.float64), normaliser))
        return real_update_policy(run, rollout, rewards, applicable, tokens, completion_mask, normaliser)

    monkeypatch.setattr(trainer, "distributed", OneMoreRank())
    monkeypatch.setattr(trainer, "update_policy", recording_update_policy)
    _, (metrics,) = train_fixed(case_config(tiny_model_dir, tmp_path / "run", loss_type="bnpo", beta=0.0, steps=1))
    (rewards, mask, normaliser), = seen
    lengths, ranks_with_rows = mask.sum(axis=1), 2
    assert normaliser == pytest.approx(1.0 / (lengths.sum() * ranks_with_rows), rel=1e-12)
    expected = -(ref_advantages(rewards, 4) * lengths).sum() / lengths.sum() / ranks_with_rows
    assert abs(expected) > 1e-3 and metrics["loss"] == pytest.approx(expected, rel=1e-4)


def test_update_metric_names_match_what_the_loss_reports(tiny_model_dir, tmp_path):
    """Ranks reduce update metrics by UPDATE_METRICS: the loss must report exactly those."""
    import mlx.core as mx

    from grpo_mlx.train.gradients import make_loss_fn
    from grpo_mlx.train.step_metrics import UPDATE_METRICS
    from grpo_mlx.train.trainer import setup

    run = setup(case_config(tiny_model_dir, tmp_path / "run"))
    tokens = mx.array([[1, 2, 3, 4]])
    _, (metrics, _) = make_loss_fn(run.config)(run.model, tokens, mx.ones((1, 3)), mx.ones((1,)), None, None, mx.array(1.0))
    assert set(metrics) == set(UPDATE_METRICS)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(*sys.argv[2:4])

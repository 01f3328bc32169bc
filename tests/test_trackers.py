"""--report-to: every tracker gets metrics.jsonl's numbers under its names, the config and the samples,
read back offline from each tracker's own files with its own reader where it has one."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TRAINED_RUN_ARGS
from grpo_mlx.train.run_dir import foreign_entries
from grpo_mlx.ui.run_log import read_metrics
from test_reliability import CHILD, run_main

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
ALL = "wandb,tensorboard,trackio,swanlab"


def tracker_env(tmp_path) -> dict:
    """The child's environment: every tracker local and offline by default, its files under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SWANLAB_", "TRACKIO_"))}
    env.update(TRACKIO_DIR=str(tmp_path / "trackio"), TRACKIO_PROJECT="grpo-mlx-test",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               SWANLAB_SAVE_DIR=str(tmp_path / "swanlab-home"), PYTHONPATH=os.pathsep.join(sys.path))
    return env


def train_args(model_dir, run_dir, *extra):
    return ["train", "--model", str(model_dir), "--output", str(run_dir), "--reward", TEXT_REWARD, *TRAINED_RUN_ARGS,
            "--sample-every", "1", *extra]


@pytest.fixture(scope="module")
def reported_run(tiny_model_dir, tmp_path_factory):
    """A 2-step `grpo-mlx train --report-to` all four trackers, in a child process with its own environment."""
    tmp = tmp_path_factory.mktemp("reported")
    run_dir = tmp / "run"
    result = subprocess.run(CHILD + train_args(tiny_model_dir, run_dir, "--report-to", ALL), env=tracker_env(tmp),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, run_dir, read_metrics(run_dir)


def numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


# ---------------------------------------------------------------- wandb's run file


def leveldb_records(path) -> list[bytes]:
    """The records of a LevelDB-log file (wandb's and swanlab's run-*.wandb format): a 7-byte file header,
    then 32 KiB blocks of chunks, each chunk a 7-byte header (crc, length, type) and its data."""
    data, block, pos = Path(path).read_bytes(), 32768, 7
    records, pieces = [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pieces.append(chunk)
        if kind in (1, 4):  # FULL or LAST
            records.append(b"".join(pieces))
            pieces = []
    return records


def wandb_records(run_dir):
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = []
    for raw in leveldb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return Path(path).parent, records


def test_wandb_offline_run_holds_every_metric_the_config_and_the_completions(reported_run):
    _, run_dir, metrics = reported_run
    folder, records = wandb_records(run_dir)
    # A key is in item.key, or split at a nested value's levels in item.nested_key (the completions table's fields).
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [m["step"] for m in metrics]
    for logged, line in zip(history, metrics):
        assert numbers(line) and {k: logged[k] for k in numbers(line)} == numbers(line)
        table = json.loads((folder / "files" / logged["completions/path"]).read_text())
        assert table["columns"] == ["step", "prompt", "answer", "completion", "reward"]
        assert len(table["data"]) == 4 and {row[0] for row in table["data"]} == {line["step"]}
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lora_rank"] == 8 and config["group_size"] == 4 and "resume" not in config
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


# ---------------------------------------------------------------- tensorboard's event files


def test_tensorboard_event_files_read_back_with_tensorboards_reader(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, metrics = reported_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for line in metrics:
        for key, value in numbers(line).items():
            (scalar,) = [s for s in events.Scalars(key) if s.step == line["step"]]
            assert scalar.value == np.float32(value), key  # TensorBoard scalars are float32
    samples = events.Tensors("completions")
    assert [s.step for s in samples] == [m["step"] for m in metrics]
    table = [[cell.decode() for cell in row] for row in np.array(samples[0].tensor_proto.string_val).reshape(-1, 5)]
    assert table[0] == ["step", "prompt", "answer", "completion", "reward"] and len(table) == 5
    assert "config" in tags["tensors"] and b"lora_rank: 8" in events.Tensors("config")[0].tensor_proto.string_val[0]


# ---------------------------------------------------------------- trackio's local store


def test_trackio_local_store_holds_every_metric_and_the_config(reported_run):
    tmp, run_dir, metrics = reported_run
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
            "print(json.dumps({'logs': S.get_logs('grpo-mlx-test', sys.argv[1]), 'config': S.get_run_config('grpo-mlx-test', sys.argv[1])}, default=str))")
    # A child process: trackio reads TRACKIO_DIR once, when it is first imported.
    out = subprocess.run([sys.executable, "-c", code, run_dir.name], env=tracker_env(tmp), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stored = json.loads(out.stdout.strip().splitlines()[-1])
    logs = stored["logs"]
    scalars = [log for log in logs if "completions" not in log]
    assert [log["step"] for log in scalars] == [m["step"] for m in metrics]
    for log, line in zip(scalars, metrics):
        assert {k: log[k] for k in numbers(line)} == numbers(line)
    assert [log["step"] for log in logs if "completions" in log] == [m["step"] for m in metrics]
    assert stored["config"]["lora_rank"] == 8


# ---------------------------------------------------------------- swanlab's offline run


def test_swanlab_offline_run_read_back_with_swanlabs_reader(reported_run):
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    _, run_dir, metrics = reported_run
    (path,) = glob.glob(str(run_dir / "swanlog" / "run-*" / "run-*.swanlab"))
    reader, records = DataStoreReader(), []
    reader.open(path)
    while (raw := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(raw)
        records.append(record)
    scalars = {(r.scalar.key, r.scalar.step): r.scalar.value.number for r in records if r.WhichOneof("record_type") == "scalar"}
    for line in metrics:
        for key, value in numbers(line).items():
            assert scalars[(key, line["step"])] == value, key
    media = [r.media for r in records if r.WhichOneof("record_type") == "media"]
    assert [m.step for m in media] == [m["step"] for m in metrics] and all(len(m.value.items) == 4 for m in media)
    (finish,) = [r.finish for r in records if r.WhichOneof("record_type") == "finish"]
    assert finish.state == RunState.RUN_STATE_FINISHED


# ---------------------------------------------------------------- the run directory, errors, Ctrl-C


def test_tracker_folders_are_the_runs_own_files(reported_run):
    _, run_dir, _ = reported_run
    assert {"wandb", "swanlog", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    assert foreign_entries(run_dir) == []  # so --overwrite replaces such a run


@pytest.mark.parametrize("name", ["wandb", "tensorboard", "trackio", "swanlab"])
def test_a_missing_tracker_package_is_one_line_before_anything_is_made(name, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError, as when not installed
    run_dir = tmp_path / "run"
    assert run_main(["train", "--output", str(run_dir), "--steps", "1", "--report-to", f"tensorboard,{name}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --report-to {name} needs the {name} package")
    assert err[0].endswith(f'pip install "grpo-mlx[{name}]"')
    assert not run_dir.exists()


def test_an_unknown_tracker_is_refused(tmp_path, capsys):
    assert run_main(["train", "--output", str(tmp_path / "run"), "--report-to", "wandb,comet"]) == 2
    assert "unknown tracker 'comet': use wandb, tensorboard, trackio, swanlab" in capsys.readouterr().err


def test_ctrl_c_to_the_process_group_finishes_the_trackers(tiny_model_dir, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the trackers' helper processes too."""
    slow = tmp_path / "slow.py"  # text_length, slowed so that the signal lands mid-run
    slow.write_text(f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "from plugin_rewards import text_length\n\n"
                    "def slow_text_length(completions, answers, **fields):\n"
                    "    time.sleep(0.3)\n"
                    "    return text_length(completions, answers)\n")
    run_dir = tmp_path / "run"
    args = train_args(tiny_model_dir, run_dir, "--report-to", "wandb,tensorboard", "--reward", f"{slow}:slow_text_length",
                      "--steps", "50")
    proc = subprocess.Popen(CHILD + args, env=tracker_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: saved step" in err, err
    _, records = wandb_records(run_dir)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 130
    steps = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert len(steps) == len(read_metrics(run_dir)) >= 1

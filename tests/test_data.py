"""Loading prompts: built-in tasks, local files, field detection, bad rows, prompt rendering, order."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported: never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from grpo_mlx.data.examples import (  # noqa: E402
    Example,
    arithmetic_examples,
    countdown_examples,
    epoch_order,
    load_examples,
    load_examples_with_stats,
    take_examples,
)
from grpo_mlx.data.prompts import SYSTEM_PROMPTS, render_prompt, resolve_system_prompt  # noqa: E402
from grpo_mlx.core.errors import UserError  # noqa: E402

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason="GSM8K files absent")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- built-in tasks


def test_arithmetic_keeps_its_output_for_a_seed():
    assert arithmetic_examples(2, seed=0) == arithmetic_examples(2, seed=0)
    ex = arithmetic_examples(1, seed=3)[0]
    assert ex.answer == str(ex.meta["a"] + ex.meta["b"])
    assert ex.prompt == f"What is {ex.meta['a']} plus {ex.meta['b']}?"


def test_builtin_train_split_uses_the_seed_and_test_split_another():
    train = load_examples("arithmetic", limit=20, seed=5)
    assert train == arithmetic_examples(20, seed=5)
    test = load_examples("arithmetic", split="test", limit=20, seed=5)
    assert test != train and test == load_examples("arithmetic", split="test", limit=20, seed=5)
    assert len(load_examples("arithmetic", split="test")) == 500


def test_countdown_examples_are_solvable_from_their_own_numbers():
    for ex in countdown_examples(200, seed=1):
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert ex.answer == str(target)
        assert eval(ex.meta["expression"]) == target  # the construction reaches the target
        used = [int(tok) for tok in ex.meta["expression"].replace("(", " ").replace(")", " ").split()
                if tok.isdigit()]
        remaining = list(numbers)
        for x in used:  # each number at most once
            remaining.remove(x)
        assert str(numbers) in ex.prompt and str(target) in ex.prompt


def test_countdown_is_deterministic_in_its_seed():
    assert countdown_examples(30, seed=7) == countdown_examples(30, seed=7)
    assert countdown_examples(30, seed=7) != countdown_examples(30, seed=8)
    assert load_examples("countdown", limit=30, seed=7) == countdown_examples(30, seed=7)


def test_builtin_task_with_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="dev"):
        load_examples("countdown", split="dev")


# ---------------------------------------------------------------- local files


@needs_gsm8k
def test_gsm8k_file_loads_with_fields_detected():
    examples = load_examples(str(GSM8K / "test.jsonl"), limit=5)
    assert len(examples) == 5
    assert examples[0].prompt.startswith("Janet")
    assert examples[0].answer.endswith("#### 18")


@needs_gsm8k
def test_gsm8k_folder_picks_the_split_files():
    examples, skipped = load_examples_with_stats(str(GSM8K), split="test")
    assert (len(examples), skipped) == (1319, 0)


def test_problem_and_solution_fields_are_detected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "solution": "2", "level": 1}])
    assert load_examples(str(path)) == [Example(prompt="1+1?", answer="2", meta={"level": 1})]


def test_field_overrides_win_over_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "ask": "Q2", "gold": 7}])
    [ex] = load_examples(str(path), prompt_field="ask", answer_field="gold")
    assert (ex.prompt, ex.answer, ex.meta) == ("Q2", "7", {"question": "q", "answer": "a"})


def test_missing_prompt_field_error_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "y"}])
    with pytest.raises(UserError, match="text, label"):
        load_examples(str(path))
    with pytest.raises(UserError, match="text, label"):
        load_examples(str(path), prompt_field="text", answer_field="gold")


def test_no_answer_field_gives_none_answers_and_chat_prompts_stay_as_is(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": chat}, {"prompt": "plain"}])
    examples = load_examples(str(path))
    assert [(ex.prompt, ex.answer) for ex in examples] == [(chat, None), ("plain", None)]


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [
        {"question": "good", "answer": "1"},
        {"question": None, "answer": "2"},
        {"question": "  ", "answer": "3"},
        {"question": "no answer", "answer": None},
        {"question": "number", "answer": 18},
    ]
    examples, skipped = load_examples_with_stats(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [ex.prompt for ex in examples] == ["good", "number"] and skipped == 3
    assert examples[1].answer == "18"  # numbers become strings


def test_list_answers_are_bad_rows(tmp_path):
    # Arrow cannot hold a list and a string in one column, hence a file of its own.
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": ["4"]}, {"question": "r", "answer": []}])
    with pytest.raises(UserError, match="all 2 rows"):
        load_examples(str(path))


def test_limit_keeps_the_first_good_rows(tmp_path):
    rows = [{"question": None, "answer": "0"}] + [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [ex.answer for ex in load_examples(str(path), limit=2)] == ["0", "1"]


def test_all_bad_rows_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "", "answer": "1"}, {"question": None, "answer": "2"}])
    with pytest.raises(UserError, match="all 2 rows"):
        load_examples(str(path))


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_empty_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_examples(str(tmp_path / "empty.jsonl"))


def test_non_json_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text("this is not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        load_examples(str(tmp_path / "bad.jsonl"))


def test_parquet_file_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["q1", "q2"], "target": [3, 4]}), tmp_path / "d.parquet")
    assert [(ex.prompt, ex.answer) for ex in load_examples(str(tmp_path / "d.parquet"))] == [("q1", "3"), ("q2", "4")]


def test_unreachable_hub_data_set_is_a_user_error(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline even if another test module imported `datasets` first: no 24 s of retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not load.*network.*arithmetic, countdown"):
        load_examples("nobody-here/no-such-dataset-grpo-mlx")


# ---------------------------------------------------------------- split selection in folders


def folder(tmp_path, *names):
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, [{"question": name, "answer": str(i)}])
    return str(tmp_path)


def test_split_is_a_whole_word_of_the_file_name_not_a_substring(tmp_path):
    # "contest" holds "test": a substring match took contest_train.jsonl for a test file.
    data = folder(tmp_path, "contest_train.jsonl", "contest_test.jsonl")
    assert [ex.prompt for ex in load_examples(data, split="test")] == ["contest_test.jsonl"]
    assert [ex.prompt for ex in load_examples(data, split="train")] == ["contest_train.jsonl"]


def test_split_names_follow_datasets_inference(tmp_path):
    data = folder(tmp_path, "data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl",
                  "dev.jsonl", "my-eval.jsonl")
    assert len(load_examples(data, split="train")) == 2
    assert [ex.prompt for ex in load_examples(data, split="validation")] == ["dev.jsonl"]  # val, valid, dev
    assert [ex.prompt for ex in load_examples(data, split="test")] == ["my-eval.jsonl"]  # eval, testing


def test_unmatched_split_is_an_error_naming_the_files_not_all_the_files(tmp_path):
    # Before: no file matched "test", so every file was used: eval scored the training data.
    data = folder(tmp_path, "train.jsonl")
    with pytest.raises(UserError, match=r"no file in .* is of split 'test'.*found: train\.jsonl") as error:
        load_examples(data, split="test")
    assert "\n" not in str(error.value)


def test_files_without_split_names_are_the_train_split_only(tmp_path):
    data = folder(tmp_path, "problems.jsonl")
    assert [ex.prompt for ex in load_examples(data, split="train")] == ["problems.jsonl"]
    with pytest.raises(UserError, match="found: problems.jsonl"):
        load_examples(data, split="test")


def test_a_file_named_directly_is_used_whatever_the_split(tmp_path):
    folder(tmp_path, "train.jsonl")
    assert len(load_examples(str(tmp_path / "train.jsonl"), split="test")) == 1


# ---------------------------------------------------------------- Alpaca rows and encodings


def test_alpaca_rows_join_instruction_and_input(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a prime.", "input": "", "output": "7"}]
    examples = load_examples(str(write_jsonl(tmp_path / "alpaca.jsonl", rows)))
    assert [(ex.prompt, ex.answer, ex.meta) for ex in examples] == [
        ("Add the numbers.\n\n2 and 3", "5", {}), ("Name a prime.", "7", {})]
    # Naming the input field explicitly still takes it alone.
    assert load_examples(str(tmp_path / "alpaca.jsonl"), prompt_field="input", limit=1)[0].prompt == "2 and 3"


def test_invalid_utf8_is_one_line_naming_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"latin1\.jsonl is not valid UTF-8 at line 2") as error:
        load_examples(str(path))
    assert "\n" not in str(error.value)


def test_invalid_utf8_in_parquet_is_a_user_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"question": pa.array([b"ok", b"caf\xe9"], type=pa.binary()).cast(pa.string(), safe=False),
                      "answer": ["1", "2"]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_examples(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------- prompts


CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few lines, with no chat template yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Question: What is 1 plus 2?\nAnswer: 3", "system user assistant"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_plain_template_without_a_chat_template(tokenizer):
    ids = render_prompt(tokenizer, Example(prompt="What is 1 plus 2?", answer="3"), system_prompt="Be brief.")
    assert tokenizer.decode(ids) == "Be brief.\n\nQuestion: What is 1 plus 2?\nAnswer:"
    assert all(isinstance(i, int) for i in ids)


def test_chat_template_ends_with_the_generation_prompt(tokenizer):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, chat_template=CHATML)
    example = Example(prompt="What is 1 plus 2?", answer="3")
    for tok in (tokenizer, TokenizerWrapper(tokenizer)):  # plain HF returns a BatchEncoding, mlx-lm a list
        ids = render_prompt(tok, example, system_prompt=resolve_system_prompt("r1"))
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        text = tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPTS["r1"])
        assert text.endswith("<|im_start|>user\nWhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n")


def test_resolve_system_prompt():
    assert resolve_system_prompt(None) is None and resolve_system_prompt("none") is None
    assert "<think>" in resolve_system_prompt("r1") and "<answer>" in resolve_system_prompt("r1")
    assert resolve_system_prompt("Answer in French.") == "Answer in French."


# ---------------------------------------------------------------- order


def test_epoch_order_is_a_deterministic_permutation_that_changes_per_epoch():
    assert sorted(epoch_order(50, seed=0, epoch=0)) == list(range(50))
    assert epoch_order(50, seed=0, epoch=0) == epoch_order(50, seed=0, epoch=0)
    assert epoch_order(50, seed=0, epoch=0) != epoch_order(50, seed=0, epoch=1)


def test_take_examples_is_deterministic_and_continues_across_epochs():
    examples = arithmetic_examples(7, seed=0)
    stream = [examples[i] for i in epoch_order(7, 3, 0) + epoch_order(7, 3, 1) + epoch_order(7, 3, 2)]
    assert take_examples(examples, 3, 0, 21) == stream
    assert take_examples(examples, 3, 5, 6) == stream[5:11]  # crosses from epoch 0 into epoch 1
    # Resuming from a stored position gives what an uninterrupted run would have drawn.
    assert take_examples(examples, 3, 0, 4) + take_examples(examples, 3, 4, 10) == stream[:14]

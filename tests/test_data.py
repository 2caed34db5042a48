"""Prompt data: JSONL / parquet loading with slime's keys, chat templates, resumable shuffled order, held-out split,
and errors that name the file, the line and the keys."""

import json

import pytest

from quantrl.rl.data import (
    DataConfig,
    DataError,
    Prompt,
    PromptDataset,
    encode_prompt,
    load_data,
    load_prompts,
    train_eval_split,
)
from quantrl.tasks.tokenizer import build_tokenizer

ROWS = [{"question": f"what is {i}+{i}?", "answer": 2 * i, "src": "t"} for i in range(10)]


def write_jsonl(path, rows, blank_line_at=None):
    lines = [json.dumps(r) for r in rows]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS, blank_line_at=3), "question", "answer",
                     metadata_keys=["src"])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    p = load_prompts(tmp_path / "p.parquet", "question", "answer", metadata_keys=["src"])
    (tmp_path / "p.json").write_text(json.dumps(ROWS))  # a JSON array
    a = load_prompts(tmp_path / "p.json", "question", "answer", metadata_keys=["src"])
    assert j == p == a
    assert j[4] == Prompt("what is 4+4?", "8", 4, False, {"src": "t"})  # labels become strings
    unlabeled = load_prompts(tmp_path / "p.jsonl", "question", None)
    assert unlabeled[0].label is None and unlabeled[0].metadata is None


def test_verl_style_rows_and_file_quirks(tmp_path):
    """Nested keys (verl's ``reward_model.ground_truth``), a byte-order mark, a JSON array after blank
    space, an upper-case .PARQUET suffix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "reward_model": {"style": "rule", "ground_truth": str(i)}} for i in range(3)]
    want = [Prompt(f"q{i}", str(i), i) for i in range(3)]
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_prompts(jsonl, "prompt", "reward_model.ground_truth") == want
    (tmp_path / "v.json").write_text("\n  " + json.dumps(rows))
    assert load_prompts(tmp_path / "v.json", "prompt", "reward_model.ground_truth") == want
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v.PARQUET")
    assert load_prompts(tmp_path / "v.PARQUET", "prompt", "reward_model.ground_truth") == want
    with pytest.raises(DataError, match=r"no key 'reward_model.answer' \(no 'answer' in 'reward_model'\)"):
        load_prompts(jsonl, "prompt", "reward_model.answer")
    write_jsonl(tmp_path / "null.jsonl", [{"prompt": "a", "label": "1"}, {"prompt": "b", "label": None}])
    with pytest.raises(DataError, match="line 2: 'label' is null"):
        load_prompts(tmp_path / "null.jsonl")


def test_chat_template_is_applied_with_the_generation_prompt(tmp_path, tok):
    rows = [{"prompt": "what is 1+2?", "label": "3"},
            {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "what is 2+2?"}],
             "label": "4"}]  # fmt: skip
    ps = load_prompts(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer=tok, apply_chat_template=True)
    assert ps[0].text == "<bos>user: what is 1+2?\nassistant: " and ps[0].templated
    assert ps[1].text == "<bos>system: add\nuser: what is 2+2?\nassistant: "
    ids = encode_prompt(tok, ps[0])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # no second BOS
    plain = Prompt("what is 1+2?", "3", 0)
    assert encode_prompt(tok, plain)[0] == tok.bos_token_id  # untemplated: the tokenizer adds BOS
    with pytest.raises(DataError, match="line 2.*apply_chat_template"):
        load_prompts(tmp_path / "c.jsonl")  # messages without a template


def test_errors_name_file_line_and_keys(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "label": "1"}, {"prompt": "b", "answer": "2"}])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "line 2" in msg and "'label'" in msg and "['answer', 'prompt']" in msg
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "label": "1"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl: line 2 is not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="item 0"):
        load_prompts(tmp_path / "list.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet"):
        load_prompts(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no chat template"):
        load_prompts(path, tokenizer=build_tokenizer(chat_template=False), apply_chat_template=True)
    with pytest.raises(DataError, match="no prompts"):
        PromptDataset([])


def prompts(n=7):
    return [Prompt(f"q{i}", str(i), i) for i in range(n)]


def test_epochs_are_seeded_permutations_and_batches_cross_epochs():
    ds = PromptDataset(prompts(7), seed=3)
    first = [p.index for p in ds.next_batch(7)]
    assert sorted(first) == list(range(7)) and first != list(range(7))
    assert ds.epoch == 1 and ds.cursor == 0
    again = PromptDataset(prompts(7), seed=3)
    assert [p.index for p in again.next_batch(7)] == first  # same seed, same order
    other = PromptDataset(prompts(7), seed=4)
    assert [p.index for p in other.next_batch(7)] != first
    ds2 = PromptDataset(prompts(7), seed=3)
    stream = [p.index for _ in range(5) for p in ds2.next_batch(3)]  # 15 prompts: epochs 0, 1 and one of 2
    assert stream[:7] == first and sorted(stream[7:14]) == list(range(7)) and stream[7:14] != first
    assert stream[14] == ds2.epoch_order(2)[0] and (ds2.epoch, ds2.cursor) == (2, 1)
    plain = PromptDataset(prompts(7), shuffle=False)
    assert [p.index for p in plain.next_batch(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_resume_sees_the_same_data_order():
    whole = PromptDataset(prompts(7), seed=11)
    uninterrupted = [[p.index for p in whole.next_batch(4)] for _ in range(6)]
    run = PromptDataset(prompts(7), seed=11)
    got = [[p.index for p in run.next_batch(4)] for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
    resumed = PromptDataset(prompts(7), seed=11)
    resumed.load_state_dict(state)
    got += [[p.index for p in resumed.next_batch(4)] for _ in range(3)]
    assert got == uninterrupted
    with pytest.raises(DataError, match="seed"):
        PromptDataset(prompts(7), seed=12).load_state_dict(state)
    with pytest.raises(DataError, match="num_prompts"):
        PromptDataset(prompts(8), seed=11).load_state_dict(state)
    changed = prompts(7)
    changed[2] = Prompt("q2 edited", "2", 2)
    with pytest.raises(DataError, match="fingerprint"):
        PromptDataset(changed, seed=11).load_state_dict(state)


def test_held_out_split(tmp_path):
    ps = prompts(20)
    train, held = train_eval_split(ps, 5, seed=1)
    assert len(held) == 5 and len(train) == 15 and not {p.index for p in train} & {p.index for p in held}
    assert train_eval_split(ps, 5, seed=1) == (train, held) and train_eval_split(ps, 5, seed=2)[1] != held
    assert [p.index for p in held] == sorted(p.index for p in held)  # file order
    assert len(train_eval_split(ps, 0.25, seed=1)[1]) == 5
    with pytest.raises(DataError, match="no training prompts"):
        train_eval_split(ps, 20)
    with pytest.raises(DataError, match="eval_size"):
        train_eval_split(ps, 2.5)

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds, held = load_data(DataConfig(prompt_data=str(path), input_key="question", label_key="answer", eval_size=3))
    assert len(ds) == 7 and len(held) == 3
    ds, held = load_data(DataConfig(prompt_data=str(path), input_key="question", label_key="answer",
                                    eval_data=str(path)))  # fmt: skip
    assert len(ds) == 10 and len(held) == 10
    ds, held = load_data(DataConfig(prompt_data=str(path), input_key="question", label_key="answer"))
    assert held == []

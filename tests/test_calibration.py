"""Calibration data: parquet / jsonl / txt loading, errors, windows, with a real HF tokenizer built offline."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _tiny_models import bpe_tokenizer
from transformers import PreTrainedTokenizerFast

from quantrl.checkpoint.calibration import (
    build_calibration_batches,
    default_calibration_texts,
    load_calibration_texts,
)

WIKI_ROWS = ["", " = Valkyria Chronicles = \n", "", " Senjō no Valkyria is a tactical role playing game . \n", "   \n"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the default corpus: a real HF fast tokenizer, nothing downloaded."""
    return bpe_tokenizer(default_calibration_texts(64, seed=1))


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documented stream: texts joined by a blank line, each tokenized on its own."""
    joined = [t + "\n\n" for t in texts[:-1]] + texts[-1:]
    return [i for t in joined for i in tokenizer(t, add_special_tokens=False)["input_ids"]]


def write_parquet(path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def test_parquet_wikitext_style(tmp_path):
    f = tmp_path / "train-00000-of-00001.parquet"
    write_parquet(f, {"text": WIKI_ROWS})
    assert load_calibration_texts(f) == [WIKI_ROWS[1], WIKI_ROWS[3]]  # verbatim, empty rows dropped


def test_parquet_missing_column_names_file_and_columns(tmp_path):
    f = tmp_path / "data.parquet"
    write_parquet(f, {"content": ["a b c"], "id": [1]})
    with pytest.raises(ValueError, match=r"data\.parquet has no column 'text'; columns present: \['content', 'id'\]"):
        load_calibration_texts(f)
    assert load_calibration_texts(f, text_key="content") == ["a b c"]


def test_txt_paragraphs(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \t\nThird.\n\n   \n", encoding="utf-8")
    assert load_calibration_texts(f) == ["First paragraph\nstill first.", "Second one.", "Third."]


def test_jsonl_with_key_and_errors(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"body": "one"}, {"body": "  "}, {"body": "two"}]) + "\n\n")
    assert load_calibration_texts(f, text_key="body") == ["one", "two"]
    with pytest.raises(ValueError, match=r"docs\.jsonl:1 has no field 'text' \(found \['body'\]\)"):
        load_calibration_texts(f)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_calibration_texts(bad)


def test_directory_reads_supported_files_sorted(tmp_path):
    write_parquet(tmp_path / "b.parquet", {"text": ["from parquet"]})
    (tmp_path / "a.txt").write_text("from txt\n\nsecond txt")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("not searched")
    assert load_calibration_texts(tmp_path) == ["from txt", "second txt", "from parquet", "from jsonl"]


def test_a_dataset_folder_calibrates_on_its_train_split(tmp_path):
    """wikitext-2-raw-v1/ holds train-, validation- and test- files: the test text must not calibrate."""
    for split in ("test", "train", "validation"):
        write_parquet(tmp_path / f"{split}-00000-of-00001.parquet", {"text": [f"{split} row"]})
    with pytest.warns(UserWarning, match="using the train files"):
        assert load_calibration_texts(tmp_path) == ["train row"]
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps({"text": "with a byte-order mark"}) + "\n")
    assert load_calibration_texts(tmp_path / "bom.jsonl") == ["with a byte-order mark"]


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration_texts(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    with pytest.raises(ValueError, match=r"no .*parquet.* files directly in directory.*wikitext-2-raw-v1"):
        load_calibration_texts(tmp_path)
    with pytest.raises(ValueError, match="unsupported type '.md'"):
        load_calibration_texts(tmp_path / "readme.md")
    empty = tmp_path / "empty.parquet"
    write_parquet(empty, {"text": ["", "  \n", None]})
    with pytest.raises(ValueError, match=r"no non-empty text found in .*empty\.parquet"):
        load_calibration_texts(empty)


def test_windows_shape_dtype_and_content(tokenizer):
    texts = default_calibration_texts(64)
    batches = build_calibration_batches(texts, tokenizer, num_samples=8, max_sequence_length=64, seed=0)
    assert len(batches) == 8
    stream = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
    starts = []
    for b in batches:
        assert b.dtype == torch.long and b.shape == (1, 64)
        # Every window is a contiguous slice of the tokenized corpus.
        hits = [o for o in range(len(stream) - 63) if torch.equal(stream[o : o + 64], b[0])]
        assert hits
        starts.append(hits[0])
    # Enough tokens for 8 whole windows: distinct and non-overlapping.
    starts.sort()
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))


def test_windows_deterministic_per_seed(tokenizer):
    texts = default_calibration_texts(32)
    a = build_calibration_batches(texts, tokenizer, num_samples=6, max_sequence_length=32, seed=7)
    b = build_calibration_batches(texts, tokenizer, num_samples=6, max_sequence_length=32, seed=7)
    c = build_calibration_batches(texts, tokenizer, num_samples=6, max_sequence_length=32, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_too_short_raises_with_counts(tokenizer):
    texts = ["The sum of 2 and 3 is 5."]
    n = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    msg = rf"calibration data too short: found {n} tokens in 1 texts, need at least 2048"
    with pytest.raises(ValueError, match=msg):
        build_calibration_batches(texts, tokenizer, num_samples=4, max_sequence_length=2048)


def test_few_tokens_sample_with_overlap(tokenizer):
    texts = default_calibration_texts(4)
    total = len(token_stream(tokenizer, texts))
    length = total // 2  # room for 2 whole windows, 5 requested
    with pytest.warns(UserWarning, match="with overlap"):
        batches = build_calibration_batches(texts, tokenizer, num_samples=5, max_sequence_length=length, seed=3)
    assert len(batches) == 5 and all(b.shape == (1, length) for b in batches)
    # Exactly one window when the corpus is exactly one window long.
    one = build_calibration_batches(texts, tokenizer, num_samples=1, max_sequence_length=total)
    assert one[0].shape == (1, total)


def test_argument_errors(tokenizer):
    texts = default_calibration_texts(4)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        build_calibration_batches(texts, tokenizer, num_samples=0)
    with pytest.raises(ValueError, match="max_sequence_length must be positive"):
        build_calibration_batches(texts, tokenizer, max_sequence_length=0)
    with pytest.raises(ValueError, match="non-empty list of texts"):
        build_calibration_batches([], tokenizer)


def test_default_texts_deterministic_and_english():
    a, b = default_calibration_texts(16, seed=5), default_calibration_texts(16, seed=5)
    assert a == b and a != default_calibration_texts(16, seed=6)
    assert len(a) == 16 and all(t.strip() and t.endswith(".") for t in a)

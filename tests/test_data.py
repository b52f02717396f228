import json
from collections import Counter

import pytest

from finetune_core import data as D
from finetune_core.config import DataConfig
from finetune_core.errors import DataError

from conftest import toy_rows, write_jsonl


def test_clean_text_strips_controls_and_collapses_whitespace():
    assert D.clean_text("  a\tb\x00c\u200b  d\n\n") == "a b c d"
    assert D.clean_text(" MiXed ", lowercase=True) == "mixed"


def test_clean_drops_empty_duplicates_conflicts_and_reports_why():
    texts = ["good film", "good  film", "bad film", "bad film", "   ", None, "ok", "fine"]
    labels = ["pos", "pos", "neg", "pos", "neg", "neg", None, "pos"]
    out_texts, out_labels, report = D.clean(texts, labels)
    assert out_texts == ["good film", "fine"]
    assert out_labels == ["pos", "pos"]
    assert report == {
        "rows_in": 8,
        "rows_out": 2,
        "dropped": {"conflicting_labels": 2, "duplicate": 1, "empty_text": 1, "missing_label": 1, "missing_text": 1},
    }


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = [0] * 800 + [1] * 200
    train, val, test = D.stratified_split(labels, seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert Counter(labels[i] for i in val) == {0: 80, 1: 20}
    assert Counter(labels[i] for i in test) == {0: 80, 1: 20}
    assert not set(train) & set(val) and not set(val) & set(test)
    assert D.stratified_split(labels, seed=3) == (train, val, test)
    assert D.stratified_split(labels, seed=4)[1] != val


def test_load_dataset_splits_80_10_10_and_reports(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", toy_rows(300) + [{"text": "", "label": "positive"}])
    ds = D.load_dataset(DataConfig(train=str(path)))
    rows = ds.report["rows"]
    assert sum(rows.values()) == ds.report["cleaning"]["train"]["rows_out"]
    assert rows["validation"] == rows["test"] and abs(rows["validation"] - 0.1 * sum(rows.values())) <= 2
    assert ds.label_names == ["negative", "positive"]
    assert ds.report["cleaning"]["train"]["dropped"]["empty_text"] == 1
    assert 0.9 < ds.report["classes"]["imbalance_ratio"] <= 1.2


def test_given_validation_is_used_as_is_and_no_test_is_carved(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(100))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(30, seed=9))
    ds = D.load_dataset(DataConfig(train=str(train), validation=str(val)))
    assert len(ds.splits["validation"].inputs) == len(set(r["text"] for r in toy_rows(30, seed=9)))
    assert "test" not in ds.splits


def test_csv_with_integer_labels_and_column_mapping(tmp_path):
    path = tmp_path / "d.csv"
    lines = ["sentence,y"] + [f"row number {i},{i % 3 * 5}" for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    ds = D.load_dataset(DataConfig(train=str(path), text_column="sentence", label_column="y"))
    assert ds.label_names == ["0", "5", "10"]  # numeric order, not text order


def _error(tmp_path, **kw) -> str:
    with pytest.raises(DataError) as err:
        D.load_dataset(DataConfig(**kw))
    return str(err.value)


def test_errors_before_training(tmp_path):
    assert "does not exist" in _error(tmp_path, train=str(tmp_path / "nope.jsonl"))

    bad = tmp_path / "bad.xlsx"
    bad.write_text("x")
    assert "unknown format '.xlsx'" in _error(tmp_path, train=str(bad))

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    assert "line 2 is not valid JSON" in _error(tmp_path, train=str(broken))

    rows = write_jsonl(tmp_path / "t.jsonl", toy_rows(40))
    message = _error(tmp_path, train=str(rows), label_column="sentiment")
    assert "label column 'sentiment' not found" in message and "label, text" in message

    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(20)])
    assert "one class only" in _error(tmp_path, train=str(one))

    few = write_jsonl(tmp_path / "few.jsonl", [{"text": f"t{i}", "label": "a" if i < 20 else "b"} for i in range(22)])
    assert "too few rows per class: 'b' (2)" in _error(tmp_path, train=str(few))

    reg = write_jsonl(tmp_path / "reg.jsonl", [{"text": f"t{i}", "label": "high" if i == 3 else i} for i in range(20)])
    assert "row 4: regression target 'high' is not a number" in _error(tmp_path, train=str(reg), task="text-regression")

    unseen = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "maybe"}])
    assert "label 'maybe' does not occur" in _error(tmp_path, train=str(rows), validation=str(unseen))


def test_regression_targets_are_standardised_from_train(tmp_path):
    rows = [{"text": f"value {i}", "label": float(i)} for i in range(100)]
    ds = D.load_dataset(DataConfig(train=str(write_jsonl(tmp_path / "r.jsonl", rows)), task="text-regression"))
    assert ds.label_names is None
    # from the training split only; 0..99 has mean 49.5 and std 28.9, and the strata keep both
    train = ds.splits["train"].targets
    assert ds.target_mean == pytest.approx(sum(train) / len(train)) and ds.target_mean == pytest.approx(49.5, abs=2)
    assert ds.target_std == pytest.approx(28.9, abs=1.5)
    # quantile strata: validation spans the target range rather than one end of it
    assert min(ds.splits["validation"].targets) < 20 and max(ds.splits["validation"].targets) > 80


def test_batch_order_groups_lengths_and_is_a_function_of_seed_and_epoch():
    lengths = [(i * 37) % 100 + 1 for i in range(1000)]
    a = D.batch_order(lengths, 10, True, True, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert a == D.batch_order(lengths, 10, True, True, seed=1, epoch=0)
    assert a != D.batch_order(lengths, 10, True, True, seed=1, epoch=1)
    grouped = sum(max(lengths[i] for i in b) * len(b) for b in a)
    plain = sum(max(lengths[i] for i in b) * len(b) for b in D.batch_order(lengths, 10, True, False, seed=1))
    assert grouped < 0.6 * plain  # padded tokens: length grouping pads far less


def test_loader_pads_each_batch_to_its_longest_row(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    texts = ["a", "a b c d e f", "x y"]
    enc, full = D.encode(tok, texts, [0, 1, 0], max_length=5), D.token_lengths(tok, texts)
    assert max(enc.lengths) == 5 and full[1] == 8  # 6 words + [CLS] [SEP], truncated to 5
    batch = next(iter(D.loader(enc, [[0, 2]], regression=False)))
    assert batch["inputs"]["input_ids"].shape == (2, 4)  # "x y" is 4 tokens with specials
    assert batch["inputs"]["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    report = D.token_report(full, 5)
    assert report["truncated_share"] == round(1 / 3, 4) and report["max"] == 8


def test_split_files_round_trip_label_names(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", toy_rows(50))
    ds = D.load_dataset(DataConfig(train=str(path)))
    from finetune_core.pipeline import _write_splits

    _write_splits(ds, tmp_path / "splits", "text")
    first = json.loads((tmp_path / "splits" / "validation.jsonl").read_text().splitlines()[0])
    assert first["label"] in ("negative", "positive")


def test_parquet_is_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = toy_rows(60)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ds = D.load_dataset(DataConfig(train=str(tmp_path / "t.parquet")))
    assert sum(ds.report["rows"].values()) == len({r["text"] for r in rows})

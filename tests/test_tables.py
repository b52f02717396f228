"""Tables as people have them: Excel's byte-order mark, ';' CSVs, JSON arrays; errors that say what to do."""

from __future__ import annotations

import json

import pytest

from finetune_core.errors import DataError
from finetune_core.tables import read_examples, read_table, sniff_delimiter


def test_a_byte_order_mark_does_not_rename_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("review,sentiment\r\ngreat film,pos\r\ndull,neg\r\n".encode("utf-8-sig"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    texts, labels = read_examples(path, "review", "sentiment")
    assert (texts, labels) == (["great film", "dull"], ["pos", "neg"])


def test_the_bom_is_stripped_from_jsonl_and_tsv_too(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "x", "label": 1}\n')
    tsv = tmp_path / "a.tsv"
    tsv.write_bytes(b"\xef\xbb\xbftext\tlabel\nx\t1\n")
    assert read_table(jsonl)[1] == read_table(tsv)[1] == {"text", "label"}


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_the_delimiter_of_a_csv_is_sniffed(tmp_path, delimiter):
    path = tmp_path / "data.csv"
    rows = [["text", "label", "score"], ["a, b and c", "pos", "3,5"], ["d", "neg", "1,0"]]
    if delimiter == ",":
        rows = [["text", "label", "score"], ['"a, b and c"', "pos", '"3,5"'], ["d", "neg", '"1,0"']]
    path.write_text("\n".join(delimiter.join(r) for r in rows) + "\n")
    found, columns = read_table(path)
    assert columns == {"text", "label", "score"}
    assert found[0] == {"text": "a, b and c", "label": "pos", "score": "3,5"}


def test_sniffing_prefers_the_delimiter_that_splits_the_header_most():
    assert sniff_delimiter("text;label;score\n") == ";"
    assert sniff_delimiter("text,label\n") == ","
    assert sniff_delimiter("text\n") == ","  # one column: nothing to sniff


def test_a_row_with_more_fields_than_the_header_is_named_with_its_line_and_delimiter(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,pos\nnot, quoted,neg\n")
    with pytest.raises(DataError, match=r"line 3: 3 fields, but the header has 2 \(comma-separated\); quote fields"):
        read_table(path)


def test_a_json_file_holding_an_array_of_objects_is_read(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}], indent=2))
    assert read_examples(path) == (["good", "bad"], ["pos", "neg"])


def test_a_json_file_may_also_hold_json_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    assert read_examples(path) == (["good", "bad"], ["pos", "neg"])


@pytest.mark.parametrize("content, message", [
    ('[{"text": "a"}, 3]', "item 2 of the array is a JSON number, expected an object"),
    ('[{"text": "a"},', "line 1 is not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is a JSON array, expected an object"),
])
def test_bad_json_is_named(tmp_path, content, message):
    path = tmp_path / "rows.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_table(path)


def test_a_missing_column_lists_the_columns_without_invisible_characters(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("review,sentiment\nx,y\n".encode("utf-8-sig"))
    with pytest.raises(DataError, match=r"text column 'text' not found; columns are review, sentiment \(set --text-column\)"):
        read_examples(path)


def test_text_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text.*save it as UTF-8"):
        read_table(path)


def test_embedded_newlines_in_quoted_fields_survive(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('text;label\n"line one\nline two; still text";pos\nshort;neg\n')
    rows, _ = read_table(path)
    assert rows[0]["text"] == "line one\nline two; still text" and len(rows) == 2

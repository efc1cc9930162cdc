import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.data.reading import read_chunk
from raysft.data.records import RecordError
from raysft.data.sources import expand, plan
from raysft.errors import UserError


def read_all(chunks):
    return [(where, rec if isinstance(rec, dict) else rec.reason) for c in chunks for where, _, _, rec in read_chunk(c)]


def test_jsonl_chunks_cover_every_line_with_exact_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 37)}) for i in range(500)]
    lines[10] = ""  # blank
    lines[20] = "   "  # blank
    lines[30] = "{broken"
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())  # BOM + CRLF
    for chunk_bytes in (1, 100, 1000, 10**9):
        chunks, inputs = plan([str(path)], chunk_bytes)
        got = read_all(chunks)
        expected = [(f"{path}:{i + 1}", {"text": f"record {i} " + "x" * (i % 37)}) for i in range(500)
                    if i not in (10, 20, 30)]
        expected.insert(28, (f"{path}:31", "invalid_json"))
        assert got == expected, chunk_bytes
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert inputs[0]["bytes"] == path.stat().st_size and len(inputs[0]["sha256"]) == 64
        assert inputs[0]["records"] == 500  # its lines (data.sources' weights count records by them)


def test_gzip_and_parquet_inputs(tmp_path):
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write('{"text": "one"}\n\n{"text": "two"}\n')
    pq_path = tmp_path / "c.parquet"
    table = pa.table({"messages": [[{"role": "user", "content": "q"}], None],
                      "text": [None, "t"]})
    pq.write_table(table, pq_path, row_group_size=1)
    chunks, inputs = plan([str(gz), str(pq_path)], 1 << 20)
    assert [c.fmt for c in chunks] == ["jsonl.gz", "parquet", "parquet"]
    assert [i.get("records") for i in inputs] == [None, 2]  # a .jsonl.gz is counted only when asked
    assert plan([str(gz)], 1 << 20, count=True)[1][0]["records"] == 3
    assert read_all(chunks) == [(f"{gz}:1", {"text": "one"}), (f"{gz}:3", {"text": "two"}),
                                (f"{pq_path}:row 1", {"messages": [{"role": "user", "content": "q"}]}),
                                (f"{pq_path}:row 2", {"text": "t"})]


def test_file_uri_goes_through_pyarrow_fs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "uri"}\n')
    files = expand([f"file://{tmp_path}/*.jsonl"], "data.train_files")
    assert files == [f"file://{path}"]
    chunks, inputs = plan(files, 1 << 20)
    assert read_all(chunks) == [(f"file://{path}:1", {"text": "uri"})]


def test_expand_globs_sorted_and_errors_name_the_key(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')  # an empty file is refused (tests/test_bad_input.py)
    assert expand([str(tmp_path / "*.jsonl")], "data.train_files") == [str(tmp_path / "a.jsonl"),
                                                                       str(tmp_path / "b.jsonl")]
    with pytest.raises(UserError) as info:
        expand([str(tmp_path / "nope*.jsonl"), str(tmp_path / "c.txt")], "data.train_files")
    assert str(info.value).splitlines() == [
        f"data.train_files: no file matches (got '{tmp_path}/nope*.jsonl'). fix: check the path or glob "
        "(relative paths are taken from the current directory)",
        f"data.train_files: unsupported file type (got '{tmp_path}/c.txt'). fix: use one of .jsonl.gz, .jsonl, "
        ".json.gz, .json, .parquet",
    ]


def test_record_error_is_picklable_for_ray():
    import pickle

    err = RecordError("invalid_json", "bad", "f.jsonl:3")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.message, back.where, str(back)) == ("invalid_json", "bad", "f.jsonl:3", "f.jsonl:3: bad")

"""JSON files that hold an array (issue 39, item 1): streamed, chunked at record boundaries from an index made once
per file, located as `file:record N (line L)`, damaged arrays keeping their records before the damage.

Fixtures written from the conventions as published: the original Alpaca release (stanford_alpaca's README: "a list
of dictionaries, each dictionary contains the following fields: instruction, input, output", written with
`json.dump(..., indent=4)`), and an object holding the records' array under a key, which `datasets`' json loader
reads with `field=` (its docs' example: `{"version": "0.1.0", "data": [{...}, ...]}`).
"""

import gzip
import json

import pytest

from raysft.data import jsonarray, jsonscan
from raysft.data.reading import read_chunk
from raysft.data.sources import expand, plan
from raysft.errors import UserError

ALPACA = [{"instruction": f"Give three tips for staying healthy, take {i}.", "input": "" if i % 3 else f"ctx {i}",
           "output": "1. Eat a balanced diet [with \"greens\"], {fruit}, and water.\n2. Exercise.\\n3. Sleep, é."}
          for i in range(300)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSFT_CACHE", str(tmp_path / "cache"))


def read_all(chunks):
    return [(where, n, rec if isinstance(rec, dict) else rec.reason) for c in chunks
            for where, n, _, rec in read_chunk(c)]


def lines_of(text: str, records: list) -> list[int]:
    """The line each record's object starts on, found in the text the way a person would (its '{' line)."""
    out, pos = [], 0
    for r in records:
        first = json.dumps(r, indent=4, ensure_ascii=False).splitlines()[1].strip()  # its first key's line
        pos = text.index(first, pos)
        out.append(text.count("\n", 0, pos))  # the '{' is on the line before the first key (1-based: same number)
    return out


def test_an_alpaca_array_reads_as_its_records_with_record_and_line_in_every_chunking(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonarray, "INDEX_BYTES", 512)  # a cut point every few records (64 KiB in use)
    path = tmp_path / "alpaca_data.json"
    text = json.dumps(ALPACA, indent=4, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    lines = lines_of(text, ALPACA)
    expected = [(f"{path}:record {i + 1} (line {lines[i]})", i + 1, r) for i, r in enumerate(ALPACA)]
    for chunk_bytes in (1, 5000, 10**9):
        chunks, inputs = plan([str(path)], chunk_bytes)
        assert read_all(chunks) == expected, chunk_bytes
        assert {c.fmt for c in chunks} == {"json"}
        assert inputs == [{"path": str(path), "bytes": path.stat().st_size, "sha256": inputs[0]["sha256"],
                           "records": 300}]
    assert len(plan([str(path)], 1)[0]) > 50 and 1 < len(plan([str(path)], 5000)[0]) < 20  # cut at the index's points
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(ALPACA, ensure_ascii=False))  # one line: every record on line 1
    assert [(w, r) for w, _, r in read_all(plan([str(compact)], 4096)[0])] == [
        (f"{compact}:record {i + 1} (line 1)", r) for i, r in enumerate(ALPACA)]


def test_the_index_is_made_once_per_file_content(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ALPACA[:50], indent=2))
    first, _ = plan([str(path)], 2000)

    def no_scan(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(jsonarray, "Elements", no_scan)
    assert plan([str(path)], 2000)[0] == first  # from the cache
    path.write_text(json.dumps(ALPACA[:49], indent=2))  # another content: another index
    with pytest.raises(AssertionError, match="scanned again"):
        plan([str(path)], 2000)


def test_json_gz_is_one_streamed_chunk_and_json_lines_under_a_json_name_are_detected(tmp_path):
    gz = tmp_path / "a.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        json.dump(ALPACA[:20], f, indent=4)
    chunks, inputs = plan([str(gz)], 1)
    assert [c.fmt for c in chunks] == ["json.gz"] and "records" not in inputs[0]
    assert plan([str(gz)], 1, count=True)[1][0]["records"] == 20
    assert [r for _, _, r in read_all(chunks)] == ALPACA[:20]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ALPACA[:5]))
    chunks, _ = plan([str(lines)], 1 << 20)
    assert [c.fmt for c in chunks] == ["jsonl"]
    assert read_all(chunks)[1] == (f"{lines}:2", 2, ALPACA[1])
    one = tmp_path / "one.json"  # a single record, JSON Lines of one line
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert [c.fmt for c in plan([str(one)], 1 << 20)[0]] == ["jsonl"]


def test_an_object_holding_the_array_is_read_with_json_field_or_refused_with_that_fix(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "0.1.0", "note": "[not] {this}", "data": ALPACA[:7]}, indent=2))
    with pytest.raises(UserError) as info:
        plan([str(path)], 1 << 20)
    assert str(info.value) == (f"data.train_files: holds one JSON object, not records (its keys: 'version' (string), "
                               f"'note' (string), 'data' (array)) (got '{path}'). fix: set data.json_field: data to "
                               "read the records in its array")
    chunks, inputs = plan([str(path)], 1, json_field="data")
    assert [r for _, _, r in read_all(chunks)] == ALPACA[:7]
    assert inputs[0]["json_field"] == "data" and inputs[0]["records"] == 7
    with pytest.raises(UserError, match=r"no array under data.json_field 'rows' .* fix: set data.json_field to the "
                                        r"key of the records' array \('data'\)"):
        plan([str(path)], 1, json_field="rows", key="data.sources[0].files")
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps({"data": ALPACA[:2]}))
    with pytest.raises(UserError, match="set data.json_field: data"):
        plan([str(one_line)], 1 << 20)


def cut_points(text: str) -> dict:
    """Where to cut a compact array of four records: (offset, records whole before it)."""
    starts = [1] + [text.index(', {"instruction"', text.index("take %d." % i)) + 2 for i in range(3)]
    third, fourth = starts[2], starts[3]
    return {"inside a string": (third + text[third:].index("Eat"), 2),
            "inside a key": (third + 3, 2),
            "after a record's }": (fourth - 2, 3),
            "after the comma": (fourth - 1, 3),
            "before the closing ]": (len(text) - 1, 4)}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", ["inside a string", "inside a key", "after a record's }", "after the comma",
                                  "before the closing ]"])
def test_a_cut_short_array_keeps_its_records_and_reports_the_damage_once(tmp_path, gz, case):
    text = json.dumps(ALPACA[:4], ensure_ascii=False)
    at, kept = cut_points(text)[case]
    path = tmp_path / ("cut.json.gz" if gz else "cut.json")
    path.write_bytes(gzip.compress(text[:at].encode()) if gz else text[:at].encode())
    got = read_all(plan([str(path)], 1)[0])
    assert [r for _, _, r in got] == ALPACA[:kept] + ["damaged_file"]
    assert got[-1][:2] == (f"{path}:record {kept + 1} (line 1)", kept + 1)
    if gz:  # the compressed stream itself cut short: the records before the cut, then one error
        data = gzip.compress(text.encode())
        path.write_bytes(data[: len(data) // 2])
        got = read_all(plan([str(path)], 1)[0])
        assert [r for _, _, r in got[:-1]] == ALPACA[: len(got) - 1] and got[-1][2] == "damaged_file"


def test_the_damaged_file_error_says_where_and_what(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps(ALPACA[:3], indent=4)
    path.write_text(text[: text.index("Exercise", text.index("take 1."))])
    (*_, last), = [list(read_chunk(c)) for c in plan([str(path)], 10**9)[0]]
    where, n, raw, err = last
    assert (where, n, err.reason) == (f"{path}:record 2 (line 7)", 2, "damaged_file")
    assert err.message == ("the JSON array is cut short or damaged: cut short inside record 2 (line 7); the 1 "
                           "records before it are read. fix: download the file again, or repair it (`python -m "
                           "json.tool FILE` names the first error)")


def test_bad_elements_are_bad_records_and_the_rest_is_read(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",},\n  3,\n  "str, with ] and {",\n  {"text": "c", "text": '
                    '"d"},\n  {"text": "e"}\n]\n')
    assert read_all(plan([str(path)], 1)[0]) == [
        (f"{path}:record 1 (line 2)", 1, {"text": "a"}),
        (f"{path}:record 2 (line 3)", 2, "invalid_json"),
        (f"{path}:record 3 (line 4)", 3, "not_an_object"),
        (f"{path}:record 4 (line 5)", 4, "not_an_object"),
        (f"{path}:record 5 (line 6)", 5, "duplicate_key"),
        (f"{path}:record 6 (line 7)", 6, {"text": "e"}),
    ]


@pytest.mark.parametrize("content, what", [
    ("[]", "has no records (an empty array)"),
    ('[{"text": "a"}]\n[{"text": "b"}]\n', "has more after its array's closing ] (byte 15)"),
    ('"just a string"', "is not JSON Lines, a JSON array or an object holding one"),
])
def test_arrays_that_cannot_be_read_whole_are_refused_before_ray(tmp_path, content, what):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        plan(expand([str(path)], "data.train_files"), 1 << 20)
    assert str(info.value).startswith("data.train_files: " + what)


def test_the_scanner_finds_every_element_however_the_bytes_arrive():
    import random

    rng = random.Random(0)
    values = ALPACA[:40] + [3, "s,]\\\"", None, [1, {"a": "]"}], {"deep": [[[{"x": "}"}]]]}]
    text = json.dumps(values, indent=1, ensure_ascii=False).encode()
    for _ in range(50):
        scanner, out, i = jsonscan.Elements(1, 1, 1), [], 1
        while i < len(text):
            j = i + rng.randint(1, 200)
            out += scanner.feed(text[i:j])
            i = j
        rest, damage = scanner.finish(file_end=True)
        out += rest
        assert damage is None and scanner.closed == len(text)
        assert [json.loads(e.data) for e in out] == values
        assert all(text[e.start:e.end] == e.data and e.line == text.count(b"\n", 0, e.start) + 1 for e in out)

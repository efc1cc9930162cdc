"""`raysft prepare` on Ray Data: manifest, exact rows, reuse, bad-record policies, inputs beyond JSONL."""

import json
import os

import pyarrow.parquet as pq
import pytest

from raysft.cli import main
from raysft.config import load_config
from raysft.data.chunks import Settings, render
from raysft.data.prepared import summary
from raysft.data.records import RecordError
from raysft.data.tokenize import tokenize_rendered
from raysft.prepare import prepare

from helpers import base_config, config_file, write_jsonl

pytestmark = pytest.mark.ray


def msgs(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


RECORDS = [
    {"chosen": msgs("2+2?", "4"), "rejected": msgs("2+2?", "5")},
    {"messages": msgs("Hi", "Hello there")},
    {"prompt": [{"role": "user", "content": "Name a color"}], "completion": [{"role": "assistant", "content": "Red"}]},
    {"conversations": [{"from": "human", "value": "ping"}, {"from": "gpt", "value": "pong"}]},
    {"text": "plain text, trained in full"},
] * 8


CHATML = Settings(max_seq_len=128, packing=True, loss_on="completion", system_message=None, on_bad_record="error",
                  on_overlong="truncate", hf_split="train", eval_fraction=0.0)  # the defaults (as the pipeline renders)


def rows_of(prepared, split="train"):
    files = sorted(f for f in os.listdir(os.path.join(prepared, split)) if f.endswith(".parquet"))
    out = []
    for f in files:
        out += pq.read_table(os.path.join(prepared, split, f)).to_pylist()
    return out


def load(tmp_path, cfg, overrides=()):
    return load_config(config_file(tmp_path, cfg), list(overrides))


def test_prepare_writes_rows_and_manifest_and_reuses(tmp_path, tiny_model_dir, tokenizer, ray_session):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cfg = load(tmp_path, base_config(tmp_path, tiny_model_dir, data, data={"max_seq_len": 128,
                                                                          "eval_files": data}))
    logs = []
    path, manifest = prepare(cfg, log=logs.append)
    assert path == os.path.join(cfg.output_dir, "prepared", manifest["fingerprint"][:16])
    assert sorted(os.listdir(path)) == ["eval", "manifest.json", "tokenizer", "train"]
    # the rows hold exactly the examples' tokens, each example whole, position_ids restarting
    expected = tokenize_rendered([render(r, CHATML, tokenizer) for r in RECORDS], tokenizer)
    rows = rows_of(path)
    examples = []
    for row in rows:
        start = 0
        assert row["position_ids"] == [p for n in row["seq_lengths"] for p in range(n)]
        assert row["num_tokens"] == len(row["input_ids"]) <= 128
        for n in row["seq_lengths"]:
            examples.append((row["input_ids"][start:start + n], row["labels"][start:start + n]))
            start += n
    assert sorted(map(str, examples)) == sorted(map(str, expected))
    tokens = sum(len(e[0]) for e in expected)
    assert {k: manifest[k] for k in ("records_read", "records_kept", "records_rejected", "rejected_by_reason",
                                     "examples_truncated", "examples_dropped", "tokens")} == {
        "records_read": 40, "records_kept": 40, "records_rejected": 0, "rejected_by_reason": {},
        "examples_truncated": 0, "examples_dropped": 0, "tokens": tokens}
    assert manifest["rows"] == len(rows)
    assert manifest["trained_tokens"] == sum(sum(1 for x in e[1] if x != -100) for e in expected)
    assert manifest["padding_fraction"] == round(1 - tokens / (len(rows) * 128), 6)
    assert manifest["eval"]["records_kept"] == 40
    # Ray runs in this process (4 logical CPUs on this machine's cores): no more tasks at once than cores, when the
    # logical CPUs are more (a cap equal to them is none: Ray Data's own is faster, issue 40)
    assert manifest["prepare_max_tasks"] == (os.cpu_count() if os.cpu_count() < 4 else None)
    # data.chat_template: auto (the default) resolved once to chatml (this tokenizer has no template of its own),
    # recorded in the config and the manifest
    assert cfg.data.chat_template == manifest["settings"]["chat_template"] == "chatml"
    # same fingerprint: reused, nothing recomputed (also with chatml written out: a run that started before auto was
    # the default resumes on its data); another data setting: another fingerprint
    again_path, again = prepare(cfg, log=logs.append)
    assert (again_path, again) == (path, manifest)
    assert logs[-1].startswith(f"prepare: reusing {path}")
    explicit = load(tmp_path, base_config(tmp_path, tiny_model_dir, data, data={"max_seq_len": 128, "eval_files": data,
                                                                                 "chat_template": "chatml"}))
    assert prepare(explicit, log=logs.append) == (path, manifest) and logs[-1].startswith(f"prepare: reusing {path}")
    other, other_manifest = prepare(load(tmp_path, base_config(tmp_path, tiny_model_dir, data,
                                                               data={"max_seq_len": 128, "packing": False})))
    assert other != path and other_manifest["rows"] == 40


def test_same_input_gives_the_same_rows_in_the_same_order(tmp_path, tiny_model_dir, ray_session):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS * 10)
    a = load(tmp_path, base_config(tmp_path / "a", tiny_model_dir, data, data={"max_seq_len": 64}))
    b = load(tmp_path, base_config(tmp_path / "b", tiny_model_dir, data, data={"max_seq_len": 64}))
    pa_, _ = prepare(a)
    pb, _ = prepare(b)
    assert [r["input_ids"] for r in rows_of(pa_)] == [r["input_ids"] for r in rows_of(pb)]


def test_eval_fraction_holds_out_the_same_records_every_time(tmp_path, tiny_model_dir, tokenizer, ray_session):
    from raysft.data.chunks import held_out

    records = [{"messages": msgs(f"q{i}", f"a{i}")} for i in range(200)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = load(tmp_path, base_config(tmp_path, tiny_model_dir, data, data={"max_seq_len": 64, "eval_fraction": 0.1}))
    path, manifest = prepare(cfg)
    expected_eval = [i for i in range(200) if held_out(f"{data}:{i + 1}", 0.1)]
    assert 8 <= len(expected_eval) <= 35
    assert (manifest["records_kept"], manifest["records_held_out"]) == (200 - len(expected_eval), len(expected_eval))
    assert manifest["eval"]["records_kept"] == len(expected_eval)

    def example_ids(split):
        out = []
        for row in rows_of(path, split):
            start = 0
            for n in row["seq_lengths"]:
                out.append(tuple(row["input_ids"][start:start + n]))
                start += n
        return sorted(out)

    expected = tokenize_rendered([render(r, CHATML, tokenizer) for r in records], tokenizer)
    assert example_ids("eval") == sorted(tuple(expected[i][0]) for i in expected_eval)
    assert example_ids("train") == sorted(tuple(e[0]) for i, e in enumerate(expected) if i not in expected_eval)
    # another run, in another output folder, holds out the same records
    again = load(tmp_path, base_config(tmp_path / "again", tiny_model_dir, data,
                                       data={"max_seq_len": 64, "eval_fraction": 0.1}))
    again_path, _ = prepare(again)
    assert sorted(map(str, rows_of(again_path, "eval"))) == sorted(map(str, rows_of(path, "eval")))


BAD_LINES = ['{"messages": [', '[1]', '{"messages": [{"role": "bot", "content": "x"}]}',
             '{"messages": [{"role": "user", "content": "only a question"}]}']


def test_on_bad_record_error_stops_with_file_and_line(tmp_path, tiny_model_dir, ray_session):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:3], raw_lines=BAD_LINES[:1])
    cfg = load(tmp_path, base_config(tmp_path, tiny_model_dir, data))
    with pytest.raises(RecordError) as info:
        prepare(cfg)
    assert str(info.value) == (f"{data}:4: invalid JSON: Expecting value at column 15; fix: one JSON object per line; "
                               "or skip such records with data.on_bad_record: skip (counted, and written to the "
                               "rejects file)")
    assert not os.path.exists(os.path.join(cfg.output_dir, "prepared"))  # nothing left behind, not even the folder


def test_on_bad_record_skip_counts_by_reason_and_writes_rejects(tmp_path, tiny_model_dir, tokenizer, ray_session):
    long_answer, long_question = {"messages": msgs("q", "a" * 400)}, {"messages": msgs("q" * 100, "a")}
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:5] + [long_answer, long_question],
                       raw_lines=BAD_LINES + [""])
    cfg = load(tmp_path, base_config(tmp_path, tiny_model_dir, data, data={"on_bad_record": "skip",
                                                                          "max_seq_len": 40}))
    path, m = prepare(cfg)
    assert m["rejected_by_reason"] == {"invalid_json": 1, "no_assistant": 1, "not_an_object": 1, "unknown_role": 1}
    assert (m["records_read"], m["records_kept"], m["records_rejected"]) == (11, 6, 4)
    # the long question's prompt alone fills max_seq_len: dropped and counted, never a bad record (issue 39, item 9)
    assert (m["examples_truncated"], m["examples_dropped"], m["prompt_over_max_seq_len"]) == (1, 1, 1)
    [(_, labels)] = tokenize_rendered([render(long_question, CHATML, tokenizer)], tokenizer, "completion")
    prompt = next(i for i, x in enumerate(labels) if x != -100)  # the first trained token follows the prompt
    assert prompt > 40 and m["longest_prompt"] == {"tokens": prompt, "where": f"{data}:7"}
    assert (f"examples: 1 truncated, 1 dropped (longer than max_seq_len); 1 of them a prompt alone of max_seq_len "
            f"tokens or more (the longest: {prompt} tokens, {data}:7): raise data.max_seq_len to train them"
            ) in summary(m).splitlines()
    with open(os.path.join(path, m["rejects_file"]), encoding="utf-8") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["where"], r["line"], r["reason"], r["raw"]) for r in rejects] == [
        (f"{data}:8", 8, "invalid_json", BAD_LINES[0]),
        (f"{data}:9", 9, "not_an_object", BAD_LINES[1]),
        (f"{data}:10", 10, "unknown_role", BAD_LINES[2]),
        (f"{data}:11", 11, "no_assistant", BAD_LINES[3]),
    ]
    drop = load(tmp_path, base_config(tmp_path / "d", tiny_model_dir, data,
                                      data={"on_bad_record": "skip", "max_seq_len": 40, "on_overlong": "drop"}))
    _, m = prepare(drop)
    assert (m["examples_dropped"], m["examples_truncated"], m["records_kept"], m["records_rejected"]) == (2, 0, 5, 4)
    assert m["prompt_over_max_seq_len"] == 1 and m["longest_prompt"]["where"] == f"{data}:7"
    clean = write_jsonl(tmp_path / "clean.jsonl", RECORDS[:5] + [long_question])  # under the defaults: not a stop
    _, m = prepare(load(tmp_path, base_config(tmp_path / "c", tiny_model_dir, clean, data={"max_seq_len": 40})))
    assert (m["records_kept"], m["examples_dropped"], m["prompt_over_max_seq_len"]) == (5, 1, 1)


def test_parquet_gzip_and_saved_hf_dataset_inputs(tmp_path, tiny_model_dir, ray_session):
    import gzip

    import datasets

    pq_path = tmp_path / "t.parquet"
    datasets.Dataset.from_list([{"messages": msgs("a", "b")}] * 3).to_parquet(str(pq_path))
    gz = tmp_path / "t.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"messages": msgs("c", "d")}) + "\n")
    hf_dir = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"chosen": msgs("e", "f"),
                                                                "rejected": msgs("e", "g")}] * 2)}).save_to_disk(hf_dir)
    cfg = load(tmp_path, base_config(tmp_path, tiny_model_dir, [str(pq_path), str(gz)],
                                     data={"hf_dataset": str(hf_dir), "hf_split": "train"}))
    _, m = prepare(cfg)
    assert (m["records_read"], m["records_kept"]) == (6, 6)
    assert [i["path"] for i in m["inputs"]["train"]] == [str(pq_path), str(gz), f"{hf_dir}[train]"]


def test_a_json_array_prepares_into_the_rows_of_the_same_records_in_jsonl(tmp_path, tiny_model_dir, ray_session):
    """Issue 39 item 1 through Ray Data: an Alpaca-style array (indent=4, as the original release) gives the rows the
    same records give as JSONL; a bad element and a cut-short end are rejects located by record and line."""
    good = RECORDS[:10]
    lines = write_jsonl(tmp_path / "same.jsonl", good)
    text = json.dumps(good, indent=4)
    array = tmp_path / "same.json"
    array.write_text(text)
    rows = {}
    for name, data in (("jsonl", lines), ("json", str(array))):
        path, m = prepare(load(tmp_path, base_config(tmp_path / name, tiny_model_dir, data)))
        rows[name] = rows_of(path)
        assert m["records_kept"] == 10 and m["inputs"]["train"][0]["records"] == 10
    assert rows["json"] == rows["jsonl"]
    damaged = tmp_path / "damaged.json"  # a bad element (record 3), then the file cut inside record 5
    broken = json.dumps(good[:2], indent=4)[:-2] + ',\n    {"text": "x",},\n    ' + json.dumps(good[3]) + \
        ',\n    {"messages": [{"role": "user", "con'
    damaged.write_text(broken)
    with pytest.raises(RecordError) as info:
        prepare(load(tmp_path, base_config(tmp_path / "err", tiny_model_dir, str(damaged))))
    line = broken[: broken.index('{"text": "x",}')].count("\n") + 1
    assert str(info.value) == (f"{damaged}:record 3 (line {line}): invalid JSON: Expecting property name enclosed in "
                               "double quotes at column 14; fix: make each element of the array a JSON object; or skip such "
                               "records with data.on_bad_record: skip (counted, and written to the rejects file)")
    path, m = prepare(load(tmp_path, base_config(tmp_path / "skip", tiny_model_dir, str(damaged),
                                                 data={"on_bad_record": "skip"})))
    assert m["rejected_by_reason"] == {"invalid_json": 1, "damaged_file": 1} and m["records_kept"] == 3
    with open(os.path.join(path, m["rejects_file"]), encoding="utf-8") as f:
        rejects = [json.loads(r) for r in f]
    assert [(r["where"], r["line"], r["reason"]) for r in rejects] == [
        (f"{damaged}:record 3 (line {line})", 3, "invalid_json"),
        (f"{damaged}:record 5 (line {line + 2})", 5, "damaged_file")]


def test_cli_prepare_prints_summary(tmp_path, tiny_model_dir, ray_session, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:5])
    path = config_file(tmp_path, base_config(tmp_path, tiny_model_dir, data))
    assert main(["prepare", path]) == 0
    out = capsys.readouterr().out
    assert "records: 5 read, 5 kept, 0 rejected" in out and "prepared: " in out
    assert main(["prepare", path, "data.train_files=missing.jsonl"]) == 2
    assert "raysft: error: data.train_files: no file matches" in capsys.readouterr().err


def test_runs_sharing_a_prepared_path_prepare_the_same_data_once(tmp_path, tiny_model_dir):
    """data.prepared_path: a second run (another output_dir) reuses the first's prepared dataset, starting no Ray;
    nothing is written under either output_dir/prepared."""
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    shared = str(tmp_path / "shared")
    first, m1 = prepare(load(tmp_path, base_config(tmp_path / "a", tiny_model_dir, data), [
        f"data.prepared_path={shared}"]))
    logs = []
    second, m2 = prepare(load(tmp_path, base_config(tmp_path / "b", tiny_model_dir, data), [
        f"data.prepared_path={shared}"]), log=logs.append, start_ray=lambda: logs.append("ray started"))
    assert first == second == os.path.join(shared, m1["fingerprint"][:16]) and m1 == m2
    assert logs == [f"prepare: reusing {first} (fingerprint {m1['fingerprint'][:16]}, same inputs, settings and "
                    "tokenizer)"]
    assert not os.path.exists(tmp_path / "a" / "run" / "prepared") and not os.path.exists(tmp_path / "b" / "run")


def test_a_dataset_another_run_finished_first_is_used_and_an_interrupted_one_replaced(tmp_path):
    from raysft.prepare import _move_into_place

    def folder(name, manifest):
        os.makedirs(tmp_path / name)
        if manifest is not None:
            (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        return str(tmp_path / name)

    final = str(tmp_path / "final")
    ours = folder("work1", {"fingerprint": "f", "by": "us"})
    folder("final", {"fingerprint": "f", "by": "them"})  # the other run renamed its folder into place first
    assert _move_into_place(ours, final, "f", {"fingerprint": "f", "by": "us"}) == (final, {"fingerprint": "f",
                                                                                           "by": "them"})
    assert not os.path.exists(ours)
    (tmp_path / "final" / "manifest.json").unlink()  # an interrupted attempt: no manifest
    ours = folder("work2", {"fingerprint": "f", "by": "us"})
    assert _move_into_place(ours, final, "f", {"fingerprint": "f", "by": "us"}) == (final, {"fingerprint": "f",
                                                                                           "by": "us"})
    assert json.load(open(os.path.join(final, "manifest.json")))["by"] == "us" and not os.path.exists(ours)

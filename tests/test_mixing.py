"""`data.sources`: weighted datasets mixed at prepare time (shares, seeds, per-source settings and statistics), and
a mixed run's rows seen per source in its checkpoints, resumed bit-identical."""

import json
import os

import pytest

from raysft.data.chunks import ChunkResult, train_tables
from raysft.prepare import prepare

from helpers import ROOT, base_config, config_file, write_jsonl

SAMPLE = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")


def msgs(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def mixed_config(tmp_path, model_dir, name, sources, seed=42, **data):
    from raysft.config import load_config

    cfg = base_config(tmp_path / name, model_dir, [], data={"max_seq_len": 128, "packing": False, **data})
    del cfg["data"]["train_files"]
    cfg["data"]["sources"] = sources
    cfg["train"]["seed"] = seed
    return load_config(config_file(tmp_path, cfg, f"{name}.yaml"))


def test_each_use_of_a_repeated_example_is_packed_in_another_row():
    result = ChunkResult(examples=[([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7], [-100, 7])],
                         held_out=[False] * 3, copies=[2, 1, 0])
    tables = train_tables(result, 16, True, source=1)
    assert [t.column("input_ids").to_pylist() for t in tables] == [[[1, 2, 3, 4, 5]], [[1, 2, 3]]]
    assert [t.column("source").to_pylist() for t in tables] == [[1], [1]]


def test_a_sources_own_settings_override_the_data_ones(tmp_path, tokenizer):
    """Settings.for_source: a source's system_message, columns and eval_fraction replace data.*'s for its records."""
    from raysft.data.chunks import Settings, chunk_to_examples
    from raysft.data.sources import plan

    path = write_jsonl(tmp_path / "s.jsonl", [{"dialog": msgs(f"q{i}", f"a{i}")} for i in range(40)])
    base = Settings(max_seq_len=128, packing=True, loss_on="completion", system_message="Base.",
                    on_bad_record="error", on_overlong="truncate", hf_split="train", eval_fraction=0.0)
    own = base.for_source({"system_message": "Be brief.", "columns": {"messages": "dialog"}, "eval_fraction": 0.25},
                          1.0, 42)
    result = chunk_to_examples(plan([path], 1 << 20)[0][0], own, tokenizer)
    text = tokenizer.decode(result.examples[0][0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq0") and "Base." not in text
    assert 0 < sum(result.held_out) < 40 and result.counts["records_held_out"] == sum(result.held_out)
    assert result.copies == [0 if h else 1 for h in result.held_out]  # weight ratio 1: each kept record once


def test_a_sources_column_the_records_lack_is_named_before_ray(tmp_path, tiny_model_dir):
    from raysft.errors import UserError

    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs("q", "a")}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"dialogue": msgs("q", "a")}] * 3)
    cfg = mixed_config(tmp_path, tiny_model_dir, "cols", [{"files": a}, {"files": b, "columns": {"messages": "dialog"}}])
    with pytest.raises(UserError) as info:
        prepare(cfg)
    assert str(info.value) == ("data.sources[1].columns.messages: the first 3 records have no 'dialog' (got 'dialog')."
                               " fix: did you mean 'dialogue'? they have: dialogue")


@pytest.mark.ray
def test_shares_follow_the_weights_exactly_and_the_seed_picks_the_records(tmp_path, tiny_model_dir, ray_session):
    # 7,000 records of one source (10% held out for eval: 6,300 train) and 3,000 of another, weighted 0.3 / 0.7:
    # the first is sampled to 0.3 x 9,300 = 2,790 examples, the second repeated to 6,510; source b renames its
    # fields (its own data.columns)
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs(f"a{i}", f"x{i}")} for i in range(7000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"dialog": msgs(f"b{i}", f"y{i}")} for i in range(3000)])
    sources = [{"files": a, "weight": 0.3, "eval_fraction": 0.1},
               {"files": [b], "weight": 0.7, "name": "bee", "columns": {"messages": "dialog"}}]
    one, m1 = prepare(mixed_config(tmp_path, tiny_model_dir, "one", sources))
    same, m2 = prepare(mixed_config(tmp_path, tiny_model_dir, "same", sources))
    other, m3 = prepare(mixed_config(tmp_path, tiny_model_dir, "other", sources, seed=7))
    report = {s["name"]: s for s in m1["sources"]}
    assert list(report) == ["a", "bee"]
    for name, target in (("a", 0.3), ("bee", 0.7)):
        assert report[name]["target_share"] == target and abs(report[name]["share"] - target) < 0.01, report
    held = report["a"]["records_held_out"]
    assert abs(held - 700) < 100 and m1["eval"]["records_kept"] == held  # a's own eval_fraction, to the eval split
    assert {k: report["a"][k] for k in ("records_read", "records_kept", "records_rejected")} == {
        "records_read": 7000, "records_kept": 7000 - held, "records_rejected": 0}
    assert report["bee"]["records_read"] == 3000 and report["bee"]["uses_per_record"] == round(0.7 * 9300 / 3000, 6)
    assert report["a"]["examples"] + report["bee"]["examples"] == m1["rows"]  # packing off: a row per example
    assert all(report[n]["rows"] == report[n]["examples"] and report[n]["trained_tokens"] > 0 for n in report)
    assert m1["trained_tokens"] == report["a"]["trained_tokens"] + report["bee"]["trained_tokens"]

    from test_prepare import rows_of

    rows = rows_of(one)
    assert rows == rows_of(same)  # the same seed: the same rows
    other_rows = rows_of(other)
    # another seed: other records, the same shares (a's held-out records, a hash of file and line, take a random
    # few of each block's picks: within 1%, not to the record)
    assert other_rows != rows and abs(len(other_rows) - len(rows)) <= 0.01 * len(rows)
    assert all(abs(s["share"] - s["target_share"]) < 0.01 for s in m3["sources"])
    # every record of b is used 2 or 3 times; a's picked records once; the rows say which source they hold
    from collections import Counter

    uses = Counter((r["source"], tuple(r["input_ids"])) for r in rows)
    assert set(v for (s, _), v in uses.items() if s == 1) == {2, 3}
    assert set(v for (s, _), v in uses.items() if s == 0) == {1}
    assert Counter(r["source"] for r in rows) == {0: report["a"]["examples"], 1: report["bee"]["examples"]}


@pytest.mark.ray
def test_a_mixed_run_counts_rows_per_source_in_checkpoints_and_resumes_identical(tmp_path, tiny_model_dir,
                                                                                 ray_session):
    from raysft.data.prepared import PreparedRows
    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics
    from raysft.train.schedule import Schedule

    from faults import Faults
    from helpers import weights

    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)])
    sources = [{"files": SAMPLE, "weight": 1}, {"files": small, "weight": 1, "system_message": "Be brief."}]
    results = {}
    for name, hooks in (("whole", None), ("failed", "fail")):
        cfg = mixed_config(tmp_path, tiny_model_dir, name, sources, max_seq_len=256, packing=True)
        cfg.train.max_steps, cfg.checkpoint.every_steps, cfg.cluster.max_failures = 6, 2, 1
        faults = Faults(cfg.output_dir, fail_after_step=3) if hooks else None
        results[name] = (cfg, train(None, [], cfg=cfg, hooks=faults))
    (cfg_a, a), (cfg_b, b) = results["whole"], results["failed"]
    assert [m["resumed_from"] for m in read_metrics(cfg_b.output_dir)] == [0, 0, 2, 2, 2, 2]
    assert [m["loss"] for m in read_metrics(cfg_a.output_dir)] == [m["loss"] for m in read_metrics(cfg_b.output_dir)]
    wa, wb = weights(a["final"]), weights(b["final"])
    assert all((wa[k] == wb[k]).all() for k in wa)
    # state.json: the rows each source gave the steps so far, as the schedule hands them out
    prepared_dir = os.path.join(cfg_a.output_dir, "prepared")
    rows = PreparedRows(os.path.join(prepared_dir, os.listdir(prepared_dir)[0]))
    schedule = Schedule(len(rows), cfg_a.train.global_batch_size, cfg_a.train.seed, 1, 6)
    for step in (4, 6):
        state = json.load(open(os.path.join(cfg_b.checkpoint.storage_path, cfg_b.run_name,
                                            f"checkpoint_{step:08d}", "state.json")))
        seen = [int(i) for s in range(step) for i in schedule.global_batch(s)]
        expected = {"sample_prefs": sum(rows.source[i] == 0 for i in seen), "small": sum(rows.source[i] == 1
                                                                                          for i in seen)}
        assert state["samples_seen_by_source"] == expected and sum(expected.values()) == state["samples_seen"]
        assert all(expected.values())


@pytest.mark.ray
def test_a_saved_hf_dataset_is_a_source_like_any_file(tmp_path, tiny_model_dir, ray_session):
    """data.sources: a `datasets` folder (save_to_disk, a DatasetDict) mixed 1:1 with a JSONL file: 200 + 100 records
    give 150 examples each, the dataset's sampled and the file's repeated, its own hf_split and columns applied."""
    import datasets
    from test_prepare import rows_of

    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(
        [{"dialog": msgs(f"h{i}", f"z{i}")} for i in range(200)])}).save_to_disk(saved)
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": msgs(f"b{i}", f"y{i}")} for i in range(100)])
    sources = [{"hf_dataset": saved, "hf_split": "dev", "weight": 1, "name": "hub", "columns": {"messages": "dialog"}},
               {"files": b, "weight": 1}]
    path, m = prepare(mixed_config(tmp_path, tiny_model_dir, "hf", sources))
    report = {s["name"]: s for s in m["sources"]}
    assert list(report) == ["hub", "b"]
    assert report["hub"]["records_read"] == 200 and report["b"]["records_read"] == 100
    assert report["hub"]["uses_per_record"] == 0.75 and report["b"]["uses_per_record"] == 1.5
    assert abs(report["hub"]["examples"] - 150) <= 3 and abs(report["b"]["examples"] - 150) <= 3
    assert m["inputs"]["train"][0]["path"] == f"{saved}[dev]" and m["inputs"]["train"][0]["source"] == "hub"
    rows = rows_of(path)
    assert {r["source"] for r in rows} == {0, 1} and sum(r["source"] == 0 for r in rows) == report["hub"]["examples"]

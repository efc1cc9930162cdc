"""The checkpoint folder contract: commit writes the manifest; damaged checkpoints are skipped, named, and the
previous good one is used."""

import json
import os

import pytest

from raysft import checkpoint as ckpt


def make_checkpoint(run_dir, step, world=2):
    """Ranks write their files into one folder (as Ray merges them), then rank 0 commits."""
    path = os.path.join(run_dir, ckpt.dir_name(step))
    for rank in range(world):
        local = os.path.join(run_dir, f"local-{step}-{rank}")
        os.makedirs(os.path.join(local, "model"))
        with open(os.path.join(local, "model", f"rank{rank}.bin"), "wb") as f:
            f.write(os.urandom(1000 + rank))
        if rank == 0:
            with open(os.path.join(local, ckpt.STATE), "w") as f:
                json.dump({"step": step}, f)
        ckpt.write_rank_files(local, rank)
        os.makedirs(path, exist_ok=True)
        for root, _, files in os.walk(local):
            for name in files:
                dest = os.path.join(path, os.path.relpath(os.path.join(root, name), local))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(os.path.join(root, name), dest)
    ckpt.commit(path, world)
    return path


@pytest.fixture
def run_dir(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(str(tmp_path), step)
    return str(tmp_path)


def test_commit_lists_every_rank_file_and_latest_good_is_the_newest(run_dir):
    path = os.path.join(run_dir, "checkpoint_00000006")
    manifest = json.load(open(os.path.join(path, ckpt.MANIFEST)))
    assert [f["path"] for f in manifest["files"]] == ["model/rank0.bin", "model/rank1.bin", "state.json"]
    assert manifest["world_size"] == 2
    assert ckpt.verify(path) is None
    assert ckpt.latest_good(run_dir) == path
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [6, 4, 2]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: os.remove(os.path.join(p, ckpt.MANIFEST)), "no valid manifest.json (FileNotFoundError)"),
    (lambda p: open(os.path.join(p, ckpt.MANIFEST), "w").write("{not json"), "no valid manifest.json (JSONDecodeError)"),
    (lambda p: os.truncate(os.path.join(p, "model", "rank1.bin"), 10),
     "model/rank1.bin has 10 bytes, the manifest says 1001 (truncated?)"),
    (lambda p: _flip_byte(os.path.join(p, "model", "rank0.bin")), "model/rank0.bin does not match its sha256 checksum"),
    (lambda p: os.remove(os.path.join(p, "model", "rank0.bin")), "model/rank0.bin is missing"),
])
def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_it(run_dir, damage, reason):
    newest = os.path.join(run_dir, "checkpoint_00000006")
    damage(newest)
    warnings = []
    assert ckpt.latest_good(run_dir, warn=warnings.append) == os.path.join(run_dir, "checkpoint_00000004")
    assert warnings == [f"checkpoint: skipping {newest}: {reason}"]


def test_every_checkpoint_damaged_means_none(run_dir):
    for step in (2, 4, 6):
        os.remove(os.path.join(run_dir, ckpt.dir_name(step), ckpt.MANIFEST))
    warnings = []
    assert ckpt.latest_good(run_dir, warn=warnings.append) is None
    assert len(warnings) == 3


def test_commit_refuses_when_a_rank_file_did_not_arrive(tmp_path):
    path = make_checkpoint(str(tmp_path), 2)
    os.remove(os.path.join(path, ckpt.MANIFEST))
    os.remove(os.path.join(path, "model", "rank1.bin"))
    with pytest.raises(RuntimeError, match="model/rank1.bin is missing or has the wrong size after upload"):
        ckpt.commit(path, 2)
    assert not os.path.exists(os.path.join(path, ckpt.MANIFEST))


def _flip_byte(path):
    with open(path, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))


def test_prune_keeps_the_newest_good_checkpoints_and_never_the_last_good_one(run_dir):
    broken = os.path.join(run_dir, "checkpoint_00000008")  # a crash before its manifest was written
    os.makedirs(broken)
    assert ckpt.prune(run_dir, keep=2, log=lambda s: None) == [broken, os.path.join(run_dir, "checkpoint_00000002")]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [6, 4]
    os.remove(os.path.join(run_dir, "checkpoint_00000006", ckpt.MANIFEST))  # the newest is no longer good
    assert ckpt.prune(run_dir, keep=1, log=lambda s: None) == [os.path.join(run_dir, "checkpoint_00000006")]
    assert ckpt.latest_good(run_dir) == os.path.join(run_dir, "checkpoint_00000004")  # the last good one stays


class _Payload:
    """What a tampered checkpoint could hold: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class ConfigLike:
    """Stands for the config objects DeepSpeed pickles into its model file."""

    def __init__(self, stage):
        self.stage = stage


def test_export_reads_deepspeed_model_files_without_running_pickled_code(tmp_path):
    """ZeRO-0 export reads DeepSpeed's model file with torch.load(weights_only=True): tensors come back, an
    object of some class is replaced by an inert stand-in (its code never runs), and a file that asks to call a
    function such as os.system is refused."""
    import torch

    from raysft.config import Config
    from raysft.errors import UserError
    from raysft.export import _module_weights

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(4.0)}, "ds_config": ConfigLike(2)}, path)
    weights = _module_weights(str(path))
    assert list(weights) == ["w"] and torch.equal(weights["w"], torch.arange(4.0))
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.arange(4.0)}, "ds_config": _Payload(marker)}, path)
    with pytest.raises(UserError) as info:
        _module_weights(str(path))
    assert str(info.value) == (f"{path}: refusing to load: the file asks to run posix.system when unpickled. fix: "
                               "export a checkpoint you wrote; this file was not made by DeepSpeed for raysft")
    assert not marker.exists()
    assert Config().model.trust_remote_code is False  # a model folder's own code runs only when asked for

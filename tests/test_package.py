"""The package's entry points and bundled assets."""

import filecmp
import os
import subprocess
import sys

from helpers import ROOT


def test_python_dash_m_raysft_and_console_script_run():
    for cmd in ([sys.executable, "-m", "raysft", "--help"], ["raysft", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "{prepare,train,export,generate,config}" in out


def test_bundled_sample_data_is_what_the_script_makes(tmp_path):
    from make_assets import main

    main(str(tmp_path))
    for name in ("sample_prefs.jsonl", "sample_eval.jsonl"):
        assert filecmp.cmp(os.path.join(ROOT, "examples", "data", name), tmp_path / "data" / name, shallow=False)
    assert sorted(os.listdir(tmp_path / "tiny-chatml")) == sorted(os.listdir(os.path.join(ROOT, "examples",
                                                                                          "tiny-chatml")))

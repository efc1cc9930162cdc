"""Launch paths: cluster/local.sh end to end (ray start + ray job submit), submit.sh, KubeRay manifests."""

import copy
import json
import os
import re
import shlex
import subprocess

import pytest
import yaml

from raysft.config import load_config

from helpers import ROOT, SHARED

KUBERAY = os.path.join(os.path.dirname(ROOT), "shared", "kuberay")
IMAGE_ROOT = "/home/ray/raysft/"  # WORKDIR of cluster/Dockerfile


def run_local(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return subprocess.run([os.path.join(ROOT, "cluster", "local.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def live_processes_mentioning(text):
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(p.info["cmdline"] or []):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.ray
@pytest.mark.e2e
def test_local_cluster_runs_the_quickstart_job_and_stops_only_itself(tmp_path):
    out = str(tmp_path / "run")
    result = run_local("configs/quickstart.yaml", f"output_dir={out}", "train.max_steps=4", "checkpoint.every_steps=2",
                       f"data.prepared_path={SHARED['prepared']}")  # the quickstart data, prepared once a session
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Job 'raysft-run' succeeded" in log
    assert re.search(r"ray: [0-9.]+:\d+, token authentication on", log)  # the job's driver, on ray start's cluster
    assert os.path.exists(os.path.join(out, "ray", "run", "checkpoint_00000004", "manifest.json"))
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    temp_dir = re.search(r"logs: (/tmp/raysft-ray-\w+)/", log).group(1)
    assert live_processes_mentioning(temp_dir) == []  # its raylet, GCS, dashboard and workers are gone
    assert re.search(r"Ray cluster up at 127\.0\.0\.1:\d+, dashboard http://127\.0\.0\.1:\d+", log)


def test_submit_needs_an_address_and_checks_the_config_before_submitting(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = os.path.join(ROOT, "cluster", "submit.sh")
    r = subprocess.run([script, "configs/quickstart.yaml"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "usage: cluster/submit.sh [--address http://HEAD:8265]" in r.stderr
    r = subprocess.run([script, "--address", "http://127.0.0.1:1", "configs/quickstart.yaml", "trian.lr=1"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "raysft: error: command line: trian: unknown key. fix: did you mean train?" in r.stderr


# ------------------------------------------------------------------ KubeRay, validated offline


def strict(schema):
    """The CRD schema with additionalProperties: false wherever properties are listed (typos fail)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def crd_schema(kind):
    path = os.path.join(KUBERAY, f"ray.io_{kind.lower()}s.yaml")
    if not os.path.exists(path):
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (they come with ../shared)")
    with open(path) as f:
        crd = yaml.safe_load(f)
    return strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])


def manifest(name):
    with open(os.path.join(ROOT, "cluster", "kuberay", name)) as f:
        return next(d for d in yaml.safe_load_all(f) if d["kind"] in ("RayJob", "RayCluster"))


def validate(doc):
    import jsonschema

    jsonschema.validate(doc, crd_schema(doc["kind"]))


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_manifests_validate_against_the_kuberay_crds(name):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    validate(doc)


def test_a_typo_in_a_manifest_fails_validation():
    import jsonschema

    doc = manifest("rayjob.yaml")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        validate(doc)
    doc = manifest("rayjob.yaml")
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumMounts"] = []
    with pytest.raises(jsonschema.ValidationError, match="'volumMounts' was unexpected"):
        validate(doc)


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_worker_pods_give_ray_start_the_sigterm_and_the_drain_its_time(name):
    """Preemption on KubeRay: the pods' command is used as written (the annotation) and execs KubeRay's generated
    `ray start`, so a reclaimed pod's SIGTERM reaches it and it drains the node for preemption; Kubernetes waits
    longer (terminationGracePeriodSeconds) than the drain (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S), which is longer
    than a spot offering's ~30 s notice leaves for the checkpoint."""
    doc = manifest(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert container["command"] == ["/bin/bash", "-lc", "--"]
        assert container["args"] == ["ulimit -n 65536; exec $KUBERAY_GEN_RAY_START_CMD"]
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert 30 <= int(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) < pod["terminationGracePeriodSeconds"]


def test_rayjob_runs_raysft_on_a_shipped_config_with_shared_storage_and_resume():
    spec = manifest("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raysft", "train"] and argv[2].startswith(IMAGE_ROOT)
    config_path = os.path.join(ROOT, argv[2][len(IMAGE_ROOT):])
    cfg = load_config(config_path, argv[3:])  # the config exists and validates with the entrypoint's overrides
    assert cfg.checkpoint.storage_path.startswith("/mnt/shared/") and cfg.output_dir.startswith("/mnt/shared/")
    assert cfg.run_name and "run_name=" in spec["entrypoint"]  # stable: backoffLimit retries resume
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == workers["replicas"]
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        container = pod["containers"][0]
        assert {m["mountPath"]: claims.get(m["name"]) for m in container["volumeMounts"]}["/mnt/shared"] == \
            "raysft-shared"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "raysft-ray-auth", "key": "auth_token"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    submitter_env = {e["name"] for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= submitter_env


def test_image_ray_version_equals_the_pinned_one_everywhere():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pinned = re.search(r'"ray\[[^]]+\]==([\d.]+)"', f.read()).group(1)
    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as f:
        image = re.search(r"^FROM rayproject/ray:([\d.]+)-", f.read(), re.M).group(1)
    import ray

    assert image == pinned == ray.__version__
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = manifest(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == pinned


def run_multinode(out, model_dir, modes):
    """tests/scripts/multinode.py: {mode: (its output_dir, its report)}, and the whole log."""
    import json as _json

    sample = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray Train's default poll of the workers (2 s, not the tests' 0.25 s): when a node dies, which error reaches
    # the controller first (the dead worker's failed health check, or its peer's broken collective) depends on it,
    # and the console line pinned below is the one users see with the default
    env.update({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5", "RAYSFT_ELASTIC_MONITOR_S": "5",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"})
    r = subprocess.run(["python", os.path.join(ROOT, "tests", "scripts", "multinode.py"), out, model_dir, sample,
                        modes], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = r.stdout + r.stderr
    reports = [_json.loads(ln[len("MULTINODE "):]) for ln in r.stdout.splitlines() if ln.startswith("MULTINODE ")]
    assert [x["mode"] for x in reports] == modes.split(","), log[-4000:]
    for report in reports:
        if report["mode"] == "json":  # a prepare only (test_a_json_array_prepares_over_the_nodes...)
            continue
        assert report["errors"] == []
        assert report["worker_nodes_busy"] == report["all_worker_nodes"]  # one Train worker on each worker node
        assert report["result"]["trained"] is True and report["result"]["step"] == 10
    return {x["mode"]: (f"{out}-{x['mode']}", x) for x in reports}, log


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, tiny_model_dir):
    """One three-node cluster (a head, two worker nodes): the fixed 2-worker run (a worker node killed, a new one
    joins), then the elastic run (one of the two worker nodes killed, none replaces it)."""
    return run_multinode(str(tmp_path_factory.mktemp("multinode") / "run"), tiny_model_dir, "json,fixed,elastic")


@pytest.mark.ray
@pytest.mark.e2e
def test_multi_node_on_one_machine_resumes_after_losing_a_worker_node(multinode):
    from raysft.train.metrics import read_metrics

    out, _ = multinode[0]["fixed"]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert max(m["resumed_from"] for m in metrics) >= 2  # the group restarted from a checkpoint, not from scratch
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    with open(os.path.join(out, "console.log"), encoding="utf-8") as f:  # the node's loss reached the console
        failed = [line for line in f if " failed (" in line]
    # the lost node is found by Ray Train's health check, or first by the surviving worker's collective (gloo's
    # "Connection closed by peer" or "Read error"), whichever comes first: a race of the kill with the step, both name the failure
    assert failed and all(re.match(r"train: workers? [0-9, ]+ failed \((WorkerHealthCheckFailedError: A worker health "
                                   r"check failed\. \w+.*|RuntimeError: \[[^\]]*gloo[^\]]*\] (Con|Rea).*)\); "
                                   r"restarting the workers from the last checkpoint \(restart \d of \d\)$", line)
                          for line in failed), failed


@pytest.mark.ray
@pytest.mark.e2e
def test_prepare_spreads_over_the_nodes_and_gives_the_rows_one_node_gives(multinode, tmp_path, tiny_model_dir,
                                                                          ray_session):
    """The multi-node run prepared its data on the cluster: its Ray Data tasks ran on more than one node (each task
    names its node in the manifest), and the rows equal, column by column, those of the same config prepared by a
    single-node Ray."""
    import glob
    import importlib.util

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysft.config import load_config
    from raysft.prepare import prepare

    out, _ = multinode[0]["fixed"]
    [spread] = glob.glob(os.path.join(out, "prepared", "*", "manifest.json"))
    manifest = json.load(open(spread))
    nodes = manifest["prepare_nodes"]
    assert len(nodes) >= 2 and all(n >= 1 for n in nodes.values()), nodes
    spec = importlib.util.spec_from_file_location("multinode", os.path.join(ROOT, "tests", "scripts", "multinode.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sample = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
    single, single_manifest = prepare(load_config(None, script.overrides(str(tmp_path / "single"), tiny_model_dir,
                                                                          sample)))
    assert single_manifest["fingerprint"] == manifest["fingerprint"] and len(single_manifest["prepare_nodes"]) == 1

    def rows(folder):
        files = sorted(glob.glob(os.path.join(folder, "train", "*.parquet")))
        return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()

    a, b = rows(os.path.dirname(spread)), rows(single)
    assert a.num_rows == manifest["rows"] and a.equals(b)


def examples_of(folder):
    """The examples a prepared folder's training rows hold (unpacked by their seq_lengths), sorted."""
    import glob

    import pyarrow.parquet as pq

    out = []
    for f in sorted(glob.glob(os.path.join(folder, "train", "*.parquet"))):
        for row in pq.read_table(f).to_pylist():
            at = 0
            for n in row["seq_lengths"]:
                out.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
                at += n
    return sorted(out)


@pytest.mark.ray
@pytest.mark.e2e
def test_a_json_array_prepares_over_the_nodes_into_the_examples_of_its_jsonl(multinode):
    """Issue 39: the fixed run's records written as a JSON array, prepared on the same three-node cluster: its chunks
    (cut from the array's record-boundary index) ran on more than one node, and its rows hold exactly the examples
    the JSONL's rows hold (packed per chunk, and the two files' chunks hold different records: so compared unpacked)."""
    import glob

    _, report = multinode[0]["json"]
    nodes = report["prepare_nodes"]
    assert len(nodes) >= 2 and sum(nodes.values()) >= 2, nodes
    out, _ = multinode[0]["fixed"]
    [jsonl] = glob.glob(os.path.join(out, "prepared", "*", "manifest.json"))
    expected = examples_of(os.path.dirname(jsonl))
    assert len(expected) == report["records_kept"] and examples_of(report["prepared"]) == expected


@pytest.mark.ray
@pytest.mark.e2e
def test_elastic_mode_continues_on_fewer_workers_after_losing_a_node(multinode):
    """cluster.num_workers: [1, 2]. A worker node is lost and none replaces it: Ray Train restarts the group with one
    worker, rank 0 converts the 2-worker ZeRO checkpoint to DeepSpeed's universal form, and the run continues on the
    exact next rows; losses equal the fixed 2-worker run's within 1e-5. (It runs on the fixed run's cluster, after
    it: one cluster start for both.)"""
    import json as _json

    from raysft.train.metrics import read_metrics

    runs, log = multinode
    out, _ = runs["elastic"]
    assert "was written by 2 workers, resuming on 1: converting it to DeepSpeed's universal checkpoint" in log
    metrics = read_metrics(out)
    resumed = max(m["resumed_from"] for m in metrics)
    assert [m["step"] for m in metrics] == list(range(1, 11)) and resumed >= 2
    final = os.path.join(out, "ray", os.path.basename(out), "checkpoint_00000010", "state.json")
    assert _json.load(open(final))["world_size"] == 1 and metrics[-1]["samples_seen"] == 40
    reference = read_metrics(runs["fixed"][0])
    for a, b in zip(metrics, reference):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (a["step"], a["loss"], b["loss"])


IN_PROCESS_RAY = """
import json, os, sys, time
os.environ["RAYSFT_DASHBOARD"] = "1"
from raysft.cluster import auth_line, ensure_ray
from raysft.config import load_config
ensure_ray(load_config("configs/quickstart.yaml", ["output_dir=" + sys.argv[1], "cluster.num_cpus=1"]),
           log=lambda msg: None)
import ray
print("READY " + json.dumps({"line": auth_line(), "gcs": ray.get_runtime_context().gcs_address,
                             "dashboard": ray._private.worker.get_dashboard_url()}), flush=True)
time.sleep(300)
"""


@pytest.mark.ray
@pytest.mark.e2e
def test_token_authentication_is_on_when_raysft_starts_ray_itself(tmp_path):
    """`raysft train` without an address starts Ray in-process: its GCS refuses a client with a wrong token, its
    dashboard (on 127.0.0.1) refuses a request without one, and the run's log says so. (cluster/local.sh: see the
    local-cluster test; KubeRay: the manifest test.)"""
    import json as _json
    import signal
    import urllib.error
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.Popen(["python", "-c", IN_PROCESS_RAY, str(tmp_path / "run")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        info = _json.loads(line[len("READY "):])
        assert info["line"] == f"ray: {info['gcs']}, token authentication on"
        assert info["dashboard"].startswith("127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{info['dashboard']}/api/version", timeout=30)
        assert refused.value.code in (401, 403)
        token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
        request = urllib.request.Request(f"http://{info['dashboard']}/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(request, timeout=30).status == 200
        probe = "import ray; ray.init(address='%s', logging_level='ERROR'); print('CONNECTED')" % info["gcs"]
        wrong = subprocess.run(["python", "-c", probe], env={**env, "RAY_AUTH_MODE": "token",
                                                           "RAY_AUTH_TOKEN": "not-the-token"},
                               capture_output=True, text=True, timeout=120)
        assert "CONNECTED" not in wrong.stdout and wrong.returncode != 0
        right = subprocess.run(["python", "-c", probe], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                               text=True, timeout=120)  # the token file Ray made (~/.ray/auth_token)
        assert "CONNECTED" in right.stdout, right.stderr[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def free_port():
    """A port for `ray start`, below the kernel's ephemeral range (scripts/free_port.py says why)."""
    import runpy

    return runpy.run_path(os.path.join(ROOT, "scripts", "free_port.py"))["free_port"]()


@pytest.mark.ray
@pytest.mark.e2e
def test_a_folder_only_the_head_node_sees_is_reported_before_anything_runs(tmp_path):
    """A real two-node cluster (`ray start`, token auth on) whose worker node runs in its own mount namespace with
    an empty tmpfs over the run's folder: that node cannot see what the driver writes there, as on two machines
    without shared storage. `raysft train` stops before any data task or Train worker, naming the node."""
    import signal
    import tempfile
    import time

    out = tmp_path / "run"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    gcs, temp = free_port(), tempfile.mkdtemp(prefix="raysft-ray-")
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--num-cpus=1", f"--temp-dir={temp}", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {out} && exec ray start --block "
                             f"--address=127.0.0.1:{gcs} --node-ip-address=127.0.0.1 --num-cpus=2 "
                             "--disable-usage-stats"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        count = "import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); " \
                "print(sum(n['Alive'] for n in ray.nodes()))" % gcs
        deadline = time.time() + 120
        while subprocess.run(["python", "-c", count], env=env, capture_output=True, text=True).stdout.strip() != "2":
            assert time.time() < deadline and head.poll() is None and node.poll() is None, "cluster did not come up"
            time.sleep(2)
        r = subprocess.run(["raysft", "train", "configs/quickstart.yaml", f"output_dir={out}",
                            f"cluster.address=127.0.0.1:{gcs}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    finally:
        for p in (node, head):
            os.killpg(p.pid, signal.SIGKILL)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("raysft: error:")]
    assert len(error) == 1 and re.fullmatch(
        rf"raysft: error: output_dir: not shared with every node: 1 of 2 nodes \([0-9.]+ \(id [0-9a-f]{{8}}\)\) "
        rf"do not see what the driver writes there \(got '{re.escape(str(out))}'\)\. fix: put output_dir, "
        r"checkpoint\.storage_path and data\.prepared_path on storage every node mounts at the same path \(NFS, a ReadWriteMany volume\); "
        r"checkpoint\.storage_path may also be s3:// or gs://", error[0]), error
    assert not os.path.exists(out / "prepared")  # nothing ran
    assert [f for f in os.listdir(out) if f.startswith(".raysft-shared-check")] == []


@pytest.mark.ray
@pytest.mark.e2e
def test_a_failed_job_is_its_exit_status_and_resubmitting_a_run_trains_nothing(tmp_path):
    """On one running cluster (`ray start`, token auth): a job that fails (no such data file) makes
    `cluster/submit.sh` exit 1 with raysft's error line (what cluster/local.sh exits with: it ends with submit.sh's
    status; this was a local.sh test with a cluster of its own); then two submissions of one run: the second
    reuses the id and finds the run done."""
    import time

    gcs, dash = free_port(), free_port()
    temp = f"/tmp/raysft-ray-test{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                             f"--dashboard-agent-listen-port={free_port()}",  # 52365 may be another Ray's
                             f"--temp-dir={temp}", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(90):
            if subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        submit = [os.path.join(ROOT, "cluster", "submit.sh"), "--address", address, "configs/quickstart.yaml"]
        failed = subprocess.run(submit + [f"output_dir={tmp_path}/failing", "data.train_files=/nonexistent.jsonl"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode == 1, (failed.stdout + failed.stderr)[-3000:]
        assert ("raysft: error: data.train_files: no file matches (got '/nonexistent.jsonl')"
                in failed.stdout + failed.stderr)
        cmd = submit + [f"output_dir={tmp_path}/resub", "train.max_steps=2", "checkpoint.every_steps=2",
                        f"data.prepared_path={SHARED['prepared']}"]
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-3000:]
        assert "submit.sh: raysft-resub was SUCCEEDED before; submitting it again" in out
        assert "train: run 'resub' already finished at step 2" in out
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, tiny_model_dir):
    """tests/scripts/preempt.py on one cluster of `ray start --block` nodes: a deepspeed run whose worker node is
    drained for preemption (`ray drain-node`, an 8 s deadline) and an fsdp run whose worker node's `ray start` gets
    SIGTERM (it drains itself, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=8), each beside its uninterrupted twin."""
    out = str(tmp_path_factory.mktemp("preempt") / "run")
    sample = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    r = subprocess.run(["python", os.path.join(ROOT, "tests", "scripts", "preempt.py"), out, tiny_model_dir, sample,
                        "deepspeed:drain,fsdp:sigterm"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    log = r.stdout + r.stderr
    reports = [json.loads(ln[len("PREEMPT "):]) for ln in r.stdout.splitlines() if ln.startswith("PREEMPT ")]
    assert [x["way"] for x in reports] == ["drain", "sigterm"], log[-5000:]
    return reports


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.parametrize("way", ["drain", "sigterm"])
def test_a_preempted_node_checkpoints_at_the_notice_and_the_run_ends_identical(preempted, way):
    """The notice comes after step 2 (periodic checkpoints every 5 steps): the workers checkpoint at step 3, train on
    until the node is gone, and the restart (counted as a preemption: cluster.max_failures is 0) resumes at step 4:
    nothing before the notice is trained twice, and the run ends bit-identical to its uninterrupted twin."""
    report = next(x for x in preempted if x["way"] == way)
    assert report["errors"] == []
    assert report["same_losses"] and report["same_weights"], report
    assert report["steps"] == list(range(1, 9))
    assert report["resumed_from"] == [0, 0, 0, 3, 3, 3, 3, 3], report  # resumed at the notice's step + 1
    lines = report["lines"]
    failed = [ln for ln in lines if " failed (" in ln]
    # a drained node's end is Ray's preemption, never a failure (cluster.max_failures is 0 there). When `ray start`
    # ends its own drain (SIGTERM) it stops the node at the drain's deadline, and Ray 2.60 classes that end as a
    # preemption or, when the kill comes first, as an expected termination (a failure: max_failures is 1 there)
    assert failed == [] if way == "drain" else all("received SIGTERM" in ln for ln in failed), lines
    assert any(re.fullmatch(r"preemption: node [0-9a-f]{12} \(worker 1\) is being preempted \(deadline in \d+ s\); "
                            r"checkpoint at step 3 now", ln) for ln in lines), lines
    assert any(re.fullmatch(r"preemption: checkpoint at step 3 saved in [0-9.]+ s, \d+ s before the deadline", ln)
               for ln in lines), lines
    assert any(re.fullmatch(r"train: node [0-9a-f]{12} \(worker 1\) is being preempted, its deadline in \d+ s: the "
                            r"workers checkpoint at their next step and train on until it is gone", ln)
               for ln in lines), lines
    assert failed or any(re.fullmatch(r"train: node [0-9a-f]{12} \(worker 1\) preempted( \(Ray Train stopped the "
                                      r"workers at the deadline\))?; restarting the workers from the last checkpoint "
                                      r"\(preemption restart 1 of unlimited, cluster.max_preemption_failures\)", ln)
                         for ln in lines), lines
    assert any(ln.startswith("resume: from ") and "at step 3 " in ln for ln in lines), lines


def test_preemption_lines_follow_the_controllers_states(tmp_path):
    """The driver's preemption lines from Ray Train's own controller states and errors: the notice once per notice
    (the controller re-enters its preempting state at every poll), the restart counted against
    cluster.max_preemption_failures, the stop when it is spent, and nothing for a failure or a finished run."""
    from ray.train import PreemptionError, PreemptionInfo, WorkerGroupError
    from ray.train.v2._internal.execution.controller.state import (
        ErroredState,
        FinishedState,
        PreemptingState,
        RestartingState,
        RunningState,
        ShuttingDownState,
    )

    from raysft.train.failures import PreemptionLines

    info = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"ab" * 20: [1]})
    lines = PreemptionLines(str(tmp_path), 1)
    running = RunningState()
    for state in (PreemptingState(info, 0.0), PreemptingState(info, 1.0),  # the notice, said once
                  RestartingState(PreemptionError(info, drain_timed_out=True)),
                  RestartingState(WorkerGroupError("boom", {0: RuntimeError("boom")})),  # FailureLines' to say
                  ShuttingDownState(ErroredState(PreemptionError(info, drain_timed_out=False))),
                  ShuttingDownState(FinishedState())):
        lines.after_controller_state_update(running, state)
    with open(tmp_path / "console.log", encoding="utf-8") as f:
        said = f.read().splitlines()
    node = "node " + "ab" * 6 + " (worker 1)"
    assert said == [
        f"train: {node} is being preempted, no deadline given: the workers checkpoint at their next step and train on "
        "until it is gone",
        f"train: {node} preempted (Ray Train stopped the workers at the deadline); restarting the workers from the "
        "last checkpoint (preemption restart 1 of 1, cluster.max_preemption_failures)",
        f"train: {node} preempted; no preemption restarts left (cluster.max_preemption_failures=1): the run stops"]

"""`train.report_to`: MLflow and W&B runs, on rank 0 only, through each library's own client (TensorBoard is
`metrics.MetricsWriter`'s).

A tracking run is opened when rank 0 starts. Its id goes into every checkpoint's state.json (`RunState.tracking`),
so an attempt that resumes from that checkpoint (a restarted worker group, a resubmitted job, the same command
again) continues the same tracking run instead of opening a new one. The resolved config is logged as the run's
parameters once, when the run is created, without secrets. Steps past the checkpoint that a dead attempt had
logged are logged again by the resumed one with the same values (training resumes bit-identical): MLflow keeps
both points of such a step, W&B keeps the first.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable, Optional

# train.report_to's names -> the module each needs ("" = part of raysft's own dependencies)
TRACKERS = {"tensorboard": "", "mlflow": "mlflow", "wandb": "wandb"}
SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential", re.I)
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
PARAM_CHARS = 500  # of a parameter's value (MLflow allows 6000; W&B's table stays readable)
NOT_METRICS = ("step", "total_steps", "time")


def scalars(m: dict) -> list[tuple[str, float]]:
    """A step's metrics as (tag, value): train/... and eval/..., as TensorBoard shows them."""
    return [(f"eval/{k}" if k.startswith("eval") else f"train/{k}", float(v)) for k, v in m.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]


def params(config: dict) -> dict:
    """The resolved config as flat `section.key: value` strings, without secrets: keys that name one are left out,
    user:password@ in URIs is cut.

    >>> params({"train": {"lr": 0.001, "report_to": ["mlflow"], "tracking_uri": "http://me:pw@host:5000"},
    ...         "hf_token": "x"})
    {'train.lr': '0.001', 'train.report_to': '["mlflow"]', 'train.tracking_uri': 'http://host:5000'}
    """
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if SECRET_KEY.search(str(k)):
                continue
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
                continue
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[f"{prefix}{k}"] = USERINFO.sub("", text)[:PARAM_CHARS]

    walk(config, "")
    return out


class MlflowRun:
    name = "mlflow"

    def __init__(self, uri: str, project: str, run_name: str, config: dict, run_id: str, log: Callable):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri or None)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")  # it was left RUNNING or KILLED by the dead attempt
            self.run_id = run_id
            log(f"tracking: mlflow run {run_id} continued ({self.client.tracking_uri})")
            return
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"raysft.run_name": run_name}).info.run_id
        items = [Param(k, v) for k, v in params(config).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log(f"tracking: mlflow run {self.run_id} in experiment {project!r} ({self.client.tracking_uri})")

    def metrics(self, m: dict) -> None:
        from mlflow.entities import Metric

        ms = int(m.get("time", time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, m["step"]) for k, v in scalars(m)])

    def samples(self, step: int, pairs: list) -> None:
        self.client.log_text(self.run_id, "".join(json.dumps({"step": step, "prompt": p, "answer": a},
                                                             ensure_ascii=False) + "\n" for p, a in pairs),
                             f"samples/step_{step:08d}.jsonl")

    def close(self, finished: bool) -> None:
        if finished:
            self.client.set_terminated(self.run_id, "FINISHED")


class WandbRun:
    name = "wandb"

    def __init__(self, folder: str, project: str, run_name: str, config: dict, run_id: str, log: Callable):
        import wandb

        # W&B reads its own WANDB_* variables (API key, mode, entity) on the worker
        self.run = wandb.init(project=project, name=run_name, dir=folder, id=run_id or None,
                              resume="allow" if run_id else None, config=params(config))
        self.run_id = self.run.id
        self.next_step = self.run.step  # W&B refuses steps below it: those a dead attempt logged (online)
        mode = "offline" if self.run.offline else "online"
        log(f"tracking: wandb run {self.run_id} {'continued' if run_id else 'in project ' + repr(project)} ({mode}"
            f"{', ' + self.run.url if self.run.url else ''})")

    def metrics(self, m: dict) -> None:
        if m["step"] >= self.next_step:
            self.run.log(dict(scalars(m)), step=m["step"])

    def samples(self, step: int, pairs: list) -> None:
        import wandb

        if step >= self.next_step:  # committed with the step's metrics, logged next
            self.run.log({"samples": wandb.Table(columns=["prompt", "answer"], data=[list(p) for p in pairs])},
                         step=step, commit=False)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Trackers:
    """Rank 0's tracking runs for `train.report_to` (none on other ranks)."""

    def __init__(self, cfg, rank: int, resume: Optional[dict], config: dict, log: Callable[[str], None]):
        self.runs: list = []
        if rank != 0:
            return
        t, ids = cfg.train, dict(resume or {})
        if "mlflow" in t.report_to:
            self.runs.append(MlflowRun(t.tracking_uri, t.tracking_project, cfg.run_name, config, ids.get("mlflow", ""),
                                       log))
        if "wandb" in t.report_to:
            self.runs.append(WandbRun(cfg.output_dir, t.tracking_project, cfg.run_name, config, ids.get("wandb", ""),
                                      log))

    def ids(self) -> dict:
        """{tracker: run id}, for state.json."""
        return {r.name: r.run_id for r in self.runs}

    def metrics(self, m: dict) -> None:
        for r in self.runs:
            r.metrics(m)

    def samples(self, step: int, pairs: list) -> None:
        for r in self.runs:
            r.samples(step, pairs)

    def close(self, finished: bool) -> None:
        for r in self.runs:
            r.close(finished)


def server_problem(uri: str) -> Optional[tuple[str, str]]:
    """On the driver, before Ray: (what, fix) when MLflow's tracking URI is missing or its server does not answer
    (an http(s) server is asked for /health); None when it looks usable."""
    if not uri:
        return ("mlflow needs a tracking server, and neither train.tracking_uri nor MLFLOW_TRACKING_URI is set",
                "start one (`mlflow server --host 127.0.0.1 --port 5000`) and set train.tracking_uri="
                "http://127.0.0.1:5000")
    if not uri.startswith(("http://", "https://")):
        return None  # databricks, a database URI: MLflow's client knows them
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as answer:
            if answer.status == 200:
                return None
            what = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        what = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        what = str(getattr(exc, "reason", exc))
    return (f"the MLflow tracking server does not answer ({what})",
            "start it (`mlflow server --host 0.0.0.0 --port 5000`) or fix the address; the workers must reach it too")

"""`raysft train`: the driver. Preflight, prepare if needed, TorchTrainer.fit(), export.

Everything a user can get wrong is checked here, on the driver, before any Train worker or GPU is
allocated: the config, the input files and tokenizer (`prepare` checks those first), the model's config,
storage that can be written, batch sizes against the prepared rows, and a resumed run's data fingerprint.
The run name is stable (from the config), so running the same command again resumes from the latest
good checkpoint, and a finished run is not trained again.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Optional

from raysft import capabilities, storage
from raysft import checkpoint as ckpt
from raysft.cluster import auth_line, check_machine_fits, check_shared_storage, ensure_ray
from raysft.config import Config, load_config, to_dict, worker_range
from raysft.console import Feed
from raysft.data.prepared import has_eval, short, summary
from raysft.data.sources import expand
from raysft.errors import UserError, cause, format_error
from raysft.export import export
from raysft.modeling import vocab_grows
from raysft.prepare import prepare
from raysft.train.context import WorkerJob
from raysft.train.hf_args import check_hf_args
from raysft.train.hooks import WorkerHooks
from raysft.train.loop import train_loop
from raysft.train.metrics import plot_loss
from raysft.train.resize import Universal, to_universal
from raysft.train.schedule import Schedule
from raysft.train.sequence_parallel import model_problem

ELASTIC_MONITOR_S = "RAYSFT_ELASTIC_MONITOR_S"  # elastic mode: how often Ray Train considers growing the group
ELASTIC_MONITOR_DEFAULT_S = 60.0


def preflight(cfg: Config) -> None:
    """Checks that need no Ray: model config loadable, storage writable."""
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    if name.startswith(("/", ".", "~")) and not os.path.isdir(name):
        raise UserError(format_error("model.name_or_path", "no such model folder", name,
                                     "give a folder with the model's config.json, or a hub id such as "
                                     "Qwen/Qwen2.5-0.5B-Instruct"))
    try:
        config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        raise UserError(format_error("model.name_or_path", "cannot load the model's config", cfg.model.name_or_path,
                                     f"give a local model folder or a hub id you can reach "
                                     f"({cause(exc)})")) from exc
    sp = cfg.train.sequence_parallel_size
    problem = sp > 1 and model_problem(config, sp)
    if problem:
        raise UserError(format_error("train.sequence_parallel_size", problem[0] + f" ({name})", sp, problem[1]))
    for key, path in (("output_dir", cfg.output_dir), ("checkpoint.storage_path", cfg.checkpoint.storage_path)):
        if storage.is_uri(path):
            continue
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".raysft-write-test-{uuid.uuid4().hex[:8]}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as exc:
            raise UserError(format_error(key, "storage is not writable", path,
                                         f"choose a folder you can write ({exc.strerror})")) from exc
    sources = [(f"data.sources[{i}].files", s.get("files")) for i, s in enumerate(cfg.data.sources)]
    for key, files in [("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)] + sources:
        if files:
            expand(files, key)  # a path or glob that matches nothing fails here, before Ray starts
    if capabilities.of(cfg.train.backend).hf_args:
        check_hf_args(cfg.train.hf_args)
    if "mlflow" in cfg.train.report_to:
        from raysft.train.tracking import server_problem

        # the driver's MLFLOW_TRACKING_URI goes to the workers in the config: their environment may lack it
        cfg.train.tracking_uri = cfg.train.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        problem = server_problem(cfg.train.tracking_uri)
        if problem:
            raise UserError(format_error("train.tracking_uri", problem[0], cfg.train.tracking_uri or None, problem[1]))


SCHEDULE_KEYS = ("max_steps", "epochs", "global_batch_size", "lr", "lr_scheduler", "warmup_steps")


def check_schedule_unchanged(cfg: Config, good: str) -> None:
    """A run resumes on the schedule it started with: a changed length, batch or learning-rate setting would
    silently recompute the schedule mid-run (the learning rate jumping back up, `final/` overwritten)."""
    if cfg.checkpoint.allow_schedule_change:
        return
    before = ckpt.read_config(good).get("train", {})
    changed = [f"train.{k} {before[k]!r} -> {getattr(cfg.train, k)!r}" for k in SCHEDULE_KEYS
               if k in before and before[k] != getattr(cfg.train, k)]
    if changed:
        state = ckpt.read_state(good)
        final = os.path.join(cfg.output_dir, "final")
        raise UserError(format_error(
            "checkpoint", f"run {cfg.run_name!r} was started with another schedule: {', '.join(changed)} "
            f"(its checkpoint {good} is at step {state.step} of {state.total_steps})", fix=
            f"to train further, start a new run from its model (model.name_or_path={final} and another output_dir "
            "or run_name); or set checkpoint.allow_schedule_change=true to continue this run on the new schedule "
            "knowingly"))


def worker_resources(cfg: Config) -> dict:
    """What one Ray Train worker asks for (Ray Train's defaults: 1 CPU, and 1 GPU with use_gpu)."""
    resources = dict(cfg.cluster.resources_per_worker) or {"CPU": 1}
    if cfg.cluster.use_gpu:
        resources.setdefault("GPU", 1)
    return resources


def check_resources(cfg: Config) -> None:
    """Fail now, naming both numbers, rather than wait forever for workers the cluster cannot hold."""
    import ray

    limit, verb = None, "has"
    try:  # an autoscaling cluster can grow: compare with its maximum, as Ray Train itself does
        # private: the autoscaler's maximum has no public accessor; Ray Train's own resource check reads it so
        from ray._private.state import state as ray_state

        limit, verb = ray_state.get_max_resources_from_cluster_config(), "can grow to at most"
    except Exception:
        limit = None
    if not limit:
        limit, verb = ray.cluster_resources(), "has"
    n = worker_range(cfg.cluster)[0]  # elastic mode starts with as many as fit, at least min
    need = {k: v * n for k, v in worker_resources(cfg).items()}
    lacking = {k: v for k, v in need.items() if v > limit.get(k, 0)}
    if lacking:
        have = {k: limit.get(k, 0) for k in lacking}
        key = "cluster.use_gpu" if "GPU" in lacking and not cfg.cluster.resources_per_worker else "cluster.num_workers"
        raise UserError(format_error(key, f"{n} workers need {lacking} but the cluster {verb} {have}",
                                     fix="lower cluster.num_workers or cluster.resources_per_worker, or add nodes "
                                     "(`ray status` shows what the cluster has)"))


def train(config_path: Optional[str], overrides: list[str], log: Callable[[str], None] = print,
          cfg: Optional[Config] = None, hooks: Optional[WorkerHooks] = None) -> dict:
    """Run (or resume, or recognise as finished) the training run; returns a summary dict.
    `hooks`: called inside every worker (tests inject faults with them); none for a normal run."""

    cfg = cfg or load_config(config_path, overrides)
    preflight(cfg)
    check_machine_fits(cfg)
    run_dir = ckpt.run_dir(cfg.checkpoint.storage_path, cfg.run_name)
    good = ckpt.latest_good(run_dir, warn=log)
    if good is not None:
        check_schedule_unchanged(cfg, good)
    connected = []

    def connect() -> None:  # Ray, only once it is needed: a finished run with reused data never starts it
        if not connected:
            ensure_ray(cfg, log)
            log(auth_line())
            check_resources(cfg)
            check_shared_storage(cfg)
            connected.append(True)

    prepared, manifest = prepare(cfg, log=log, start_ray=connect)
    log(summary(manifest))
    t = cfg.train
    schedule = Schedule(manifest["rows"], t.global_batch_size, t.seed, t.epochs, t.max_steps)
    if schedule.steps_per_epoch < 1:
        raise UserError(format_error("train.global_batch_size", f"larger than the {manifest['rows']} prepared rows",
                                     t.global_batch_size, "lower it, or add data"))
    final_dir = os.path.join(cfg.output_dir, "final")
    universal: Optional[Universal] = None
    if good is not None:
        state = ckpt.read_state(good)
        if state.fingerprint != manifest["fingerprint"] and not cfg.checkpoint.allow_data_change:
            raise UserError(format_error("checkpoint", f"{good} was trained on other data or data settings",
                                         short(manifest["fingerprint"]),
                                         f"it has fingerprint {short(state.fingerprint)}; use another output_dir or "
                                         "run_name, or set checkpoint.allow_data_change=true to continue anyway"))
        if state.step >= schedule.total_steps:
            log(f"train: run {cfg.run_name!r} already finished at step {state.step} ({good}); nothing to train")
            if not os.path.exists(os.path.join(final_dir, "config.json")):
                export(good, final_dir, log=log)
            return {"checkpoint": good, "final": final_dir, "trained": False, "step": state.step}
        if state.backend != t.backend:
            raise UserError(format_error("train.backend", f"{good} was written by the {state.backend} backend",
                                         t.backend, f"resume with train.backend={state.backend}, or export it "
                                         "(raysft export) and start a new run from the exported model"))
        workers = worker_range(cfg.cluster)
        caps = capabilities.of(t.backend)
        if state.world_size != cfg.cluster.num_workers and not caps.resume_other_world:
            raise UserError(format_error("cluster.num_workers", f"{good} was written by {state.world_size} workers "
                                         f"and the {t.backend} backend resumes only on as many",
                                         cfg.cluster.num_workers,
                                         f"resume with cluster.num_workers={state.world_size} (the deepspeed "
                                         "backend converts to DeepSpeed's universal checkpoint for another count, "
                                         "the fsdp backend's DCP checkpoints reshard on load)"))
        if workers[0] == workers[1] != state.world_size and state.zero_stage >= 1 and \
                caps.resume_other_world == "universal":
            # only when there is training left to do; in elastic mode rank 0 converts once the size is known
            universal = to_universal(good, state, cfg.output_dir, workers[0], log)
    connect()
    if ckpt.forget_ray_snapshot(run_dir):
        log(f"train: cleared Ray Train's checkpoint list in {run_dir}; resuming from raysft's verified checkpoints")
    vocab_grew = vocab_grows(cfg.model.name_or_path, manifest["tokenizer"]["vocab_size"], cfg.model.trust_remote_code)
    job = WorkerJob(config=to_dict(cfg), prepared=prepared, fingerprint=manifest["fingerprint"],
                    has_eval=has_eval(manifest), vocab_grew=vocab_grew, universal=universal,
                    hooks=hooks or WorkerHooks())
    with Feed(cfg.output_dir, out=log):  # rank 0's lines, printed here as they come
        result = fit(cfg, job)
    good = ckpt.latest_good(run_dir, warn=log)
    if good is None or ckpt.read_state(good).step < schedule.total_steps:
        raise RuntimeError(f"training ended without a final checkpoint in {run_dir} ({result.error})")
    title = f"{cfg.run_name}: {cfg.model.name_or_path}, {schedule.total_steps} steps"
    log(f"train: loss curve {plot_loss(cfg.output_dir, title)}")  # before the export: its model card shows it
    export(good, final_dir, log=log)
    return {"checkpoint": good, "final": final_dir, "trained": True, "step": schedule.total_steps}


def fit(cfg: Config, job: WorkerJob):
    """Ray Train runs the backend's worker function on the cluster with `job`; Ray's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysft.train.failures import FailureLines, PreemptionLines

    c = cfg.cluster
    resources = dict(c.resources_per_worker) or None
    elastic_monitor_s = float(os.environ.get(ELASTIC_MONITOR_S, ELASTIC_MONITOR_DEFAULT_S))
    trainer = TorchTrainer(
        train_loop,  # the one loop (loop.py): the backend it runs is the config's
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=c.num_workers if isinstance(c.num_workers, int) else
                                     tuple(c.num_workers), use_gpu=c.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=elastic_monitor_s),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.checkpoint.storage_path,
                             failure_config=FailureConfig(max_failures=c.max_failures,
                                                          max_preemption_failures=c.max_preemption_failures),
                             callbacks=[FailureLines(os.path.abspath(cfg.output_dir), c.max_failures),
                                        PreemptionLines(os.path.abspath(cfg.output_dir),
                                                        c.max_preemption_failures)],
                             # raysft prunes after each commit (checkpoint.prune): Ray's num_to_keep would delete the
                             # previous checkpoint before the new one is verified
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    return fit_interruptibly(trainer)


def fit_interruptibly(trainer):
    """`trainer.fit()` on a helper thread, the main thread waiting in short joins: a signal then reaches the
    handler raysft's CLI installed (which stops Ray and says where the run stands) at once. (On the main thread,
    Ray Train would install its own SIGINT handler, whose abort ends the process with status 1 and no word.)"""
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="raysft-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

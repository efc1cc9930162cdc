"""The `raysft` command: parse arguments, load the config, dispatch. User mistakes print one line each."""

from __future__ import annotations

import argparse
import os
import sys

from raysft.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysft", description="Supervised fine-tuning of chat models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="show Ray's, DeepSpeed's and the libraries' "
                         "own output too (also RAYSFT_VERBOSE=1)")
    for name, text in (("prepare", "JSONL -> ChatML -> tokens -> packed Parquet rows (Ray Data)"),
                       ("train", "prepare if needed, then train on Ray Train workers")):
        s = sub.add_parser(name, help=text, description=text, parents=[verbose])
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=2e-5")
    s = sub.add_parser("export", help="checkpoint -> Hugging Face model folder", parents=[verbose])
    s.add_argument("checkpoint")
    s.add_argument("out_dir")
    s.add_argument("--merge", action="store_true", help="LoRA runs: write the base model with the adapter merged in "
                   "(default: the adapter folder)")
    s = sub.add_parser("generate", help="chat with an exported model", parents=[verbose])
    s.add_argument("model_dir")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s = sub.add_parser("config", help="config tools")
    csub = s.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _prepare(args) -> None:
    from raysft.cluster import check_shared_storage, ensure_ray
    from raysft.config import load_config
    from raysft.data.prepared import summary
    from raysft.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    path, manifest = prepare(cfg, start_ray=lambda: (ensure_ray(cfg), check_shared_storage(cfg)))
    print(summary(manifest))
    print(f"prepared: {path}")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind to `main`, which stops Ray and says where the run stands."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def interrupted(args, signum: int) -> int:
    """Stop what this command started (Ray in this process, and so every worker), then one line: where the run
    stands and how to go on. Exit status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C does not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # stopping is best effort; the line below matters more
        pass
    print(f"raysft: {where_the_run_stands(args)}", file=sys.stderr, flush=True)
    return 128 + signum


def where_the_run_stands(args) -> str:
    from raysft import checkpoint as ckpt
    from raysft.config import load_config
    from raysft.train.metrics import read_metrics

    if args.command != "train":
        return "interrupted; nothing was written (a prepared dataset is complete or absent); run the same command again"
    cfg = load_config(args.config, args.overrides)
    steps = read_metrics(cfg.output_dir)
    reached = f"interrupted at step {steps[-1]['step']}" if steps else "interrupted before the first step"
    good = ckpt.latest_good(ckpt.run_dir(cfg.checkpoint.storage_path, cfg.run_name), warn=lambda msg: None)
    last = f"last good checkpoint: {good} (step {ckpt.read_state(good).step})" if good else "no checkpoint yet"
    return f"{reached}; {last}; run the same command to resume"


def main(argv=None) -> int:
    import signal

    from raysft import console

    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.set_verbose(getattr(args, "verbose", False))
    console.quiet()
    handlers = {}
    if args.command in ("prepare", "train"):
        handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except Interrupted as exc:
        return interrupted(args, exc.signum)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run(args) -> int:
    try:
        if args.command == "prepare":
            _prepare(args)
        elif args.command == "config":
            from raysft.config import load_config, to_yaml

            print(to_yaml(load_config(args.config, args.overrides)), end="")
        elif args.command == "train":
            from raysft.train.launch import train

            train(args.config, args.overrides)
        elif args.command == "export":
            from raysft.export import export

            export(args.checkpoint, args.out_dir, merge=args.merge)
        elif args.command == "generate":
            from raysft.export import generate

            print(generate(args.model_dir, args.prompt, args.max_new_tokens))
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"raysft: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

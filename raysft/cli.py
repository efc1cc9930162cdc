"""The `raysft` command: parse arguments, load the config, dispatch. User mistakes print one line each."""

from __future__ import annotations

import argparse
import os
import sys

from raysft.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysft", description="Supervised fine-tuning of chat models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "JSONL -> ChatML -> tokens -> packed Parquet rows (Ray Data)"),
                       ("train", "prepare if needed, then train on Ray Train workers")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=2e-5")
    s = sub.add_parser("export", help="checkpoint -> Hugging Face model folder")
    s.add_argument("checkpoint")
    s.add_argument("out_dir")
    s.add_argument("--merge", action="store_true", help="LoRA runs: write the base model with the adapter merged in "
                   "(default: the adapter folder)")
    s = sub.add_parser("generate", help="chat with an exported model")
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
    from raysft.cluster import check_shared_storage, ensure_ray, logical_cpus
    from raysft.config import load_config
    from raysft.data.prepared import summary
    from raysft.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    path, manifest = prepare(cfg, start_ray=lambda: (ensure_ray(cfg), check_shared_storage(cfg)),
                             cpus=logical_cpus(cfg))
    print(summary(manifest))
    print(f"prepared: {path}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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

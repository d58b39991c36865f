"""`launch.py report RUN_DIR`: the run's curves as PNG plots and a one-page Markdown summary, written
into `<run>/report/` (an online run's: pipeline/online/report.py). Reads only the run directory's files (metrics.jsonl, summary.json, config.yaml),
so it works on a finished run, a resumed one, or one copied from a cluster."""

import json
import os

import yaml

from pipeline.train.trackers import read_metrics

# file, title, the metrics drawn in it
PANELS = [
    ("loss.png", "KTO loss", ["loss", "eval/loss"]),
    ("kl.png", "KL estimate z0 (clamped) and its unclamped mean", ["kl", "kl_unclamped", "eval/kl"]),
    ("rewards.png", "implied rewards (beta x log-ratio)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("eval_accuracy.png", "held-out implied-reward accuracy", ["eval/accuracy"]),
    ("learning_rate.png", "learning rate", ["learning_rate"]),
]


def plot(steps: list[dict], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    written = []
    for file, title, names in PANELS:
        series = {name: [(m["step"], m[name]) for m in steps if m.get(name) is not None] for name in names}
        series = {name: points for name, points in series.items() if points}
        if not series:
            continue  # e.g. no eval/ metrics in a run without an eval set
        figure, axes = plt.subplots(figsize=(6.4, 3.6))
        for name, points in series.items():
            axes.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, label=name)
        axes.set(title=title, xlabel="optimizer step")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(folder, file), dpi=110)
        plt.close(figure)
        written.append(file)
    return written


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_markdown(run_dir: str, steps: list[dict], plots: list[str]) -> str:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    final, data = summary["final_metrics"], summary["data"]
    k, t = config["kto"], config["training"]
    evaluated = [m for m in steps if m.get("eval/accuracy") is not None]
    lines = [
        f"# KTO run `{os.path.basename(os.path.abspath(run_dir))}`",
        "",
        f"- model: `{config['model']['name_or_path']}`; data: `{config['data']['path']}`",
        f"- beta {k['beta']}, desirable_weight {_number(summary['desirable_weight'])}, undesirable_weight "
        f"{k['undesirable_weight']}, max_length {k['max_length']}; learning_rate {t['learning_rate']} "
        f"({t['lr_scheduler_type']}), global batch {summary['global_batch_size']}",
        f"- {summary['num_workers']} workers, strategy {summary.get('strategy', 'ddp')}; reference "
        f"{summary['reference']['backend']} ({summary['reference']['dtype']})",
        f"- data: {data['read']} examples read, {data['kept']} kept, "
        + (f"{data['held_out']} held out for eval, " if data.get("held_out") else "")
        + f"{data['rejected']} rejected; "
        f"{summary['label_counts']['desirable']} desirable, {summary['label_counts']['undesirable']} undesirable",
        f"- {summary['steps']} steps in {_number(summary['wall_time_s'])} s "
        f"(training {_number(summary['train_time_s'])} s, {_number(summary['train_tokens_per_s'])} tokens/s)",
        "",
        "| at the end | loss | kl | rewards/margins | eval/loss | eval/accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| step {final['step']} | {_number(final['loss'])} | {_number(final['kl'])} | "
        f"{_number(final.get('rewards/margins'))} | {_number(final.get('eval/loss'))} | "
        f"{_number(final.get('eval/accuracy'))} |",
    ]
    if evaluated:
        best = max(evaluated, key=lambda m: m["eval/accuracy"])
        lines += ["", f"Best held-out accuracy: {_number(best['eval/accuracy'])} at step {best['step']} "
                      f"(eval/loss {_number(best['eval/loss'])})."]
    lines.append("")
    for name in ("eval_before", "eval_after"):
        if summary.get(name):
            facts = ", ".join(f"{key} {_number(value)}" for key, value in summary[name].items()
                              if key != "sample_generation")
            lines += [f"Held-out check {name.split('_')[1]} training: {facts}.", ""]
    lines += [f"![{file}]({file})" for file in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, "online.sqlite")):
        from pipeline.online.report import write_online_report

        return write_online_report(run_dir)
    folder = os.path.join(run_dir, "report")
    os.makedirs(folder, exist_ok=True)
    steps = read_metrics(run_dir)
    plots = plot(steps, folder)
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write(summary_markdown(run_dir, steps, plots))
    return path

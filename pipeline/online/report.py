"""`launch.py report RUN_DIR` for an online run: the held-out pass rate per round and the KTO
metrics of each round's training as PNG plots, and the per-round table, from the run's ledger and
its rounds' metrics.jsonl (nothing else: a run copied from a cluster reports the same)."""

import os

from pipeline.online.ledger import RoundLedger
from pipeline.train.trackers import read_metrics

TIMINGS = ("sample_s", "label_s", "data_and_score_s", "train_s", "sync_s", "held_out_s")


def write_online_report(run_dir: str) -> str:
    ledger = RoundLedger(os.path.join(run_dir, "online.sqlite"))
    try:
        rounds = ledger.rounds()
    finally:
        ledger.close()
    folder = os.path.join(run_dir, "report")
    os.makedirs(folder, exist_ok=True)
    steps = []  # every training step of every round, numbered across rounds
    for row in rounds:
        run = os.path.join(run_dir, "rounds", f"round-{row['round']:04d}", "run")
        if row["round"] and os.path.exists(os.path.join(run, "metrics.jsonl")):
            steps += [{**m, "round": row["round"], "step": len(steps) + 1} for m in read_metrics(run)]
    plots = _plot(rounds, steps, folder)
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write(_markdown(run_dir, rounds, plots))
    return path


def _plot(rounds: list[dict], steps: list[dict], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    # Both at the policy they measure: round r's samples were drawn by the policy after round r - 1.
    for name, points in (
            ("held-out prompts", [(r["round"], r["held_out"]["pass_rate"]) for r in rounds
                                  if r["held_out"] and r["held_out"].get("pass_rate") is not None]),
            ("the next round's training prompts", [(r["round"] - 1, r["counts"]["pass_rate"]) for r in rounds
                                                   if r["round"] and r["counts"].get("pass_rate") is not None])):
        if points:
            axes.plot(*zip(*points), marker="o", label=name)
    axes.set(title="labeler pass rate of the policy's samples", xlabel="policy after round (0: the start model)",
             ylim=(-0.02, 1.02))
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "pass_rate.png"), dpi=110)
    plt.close(figure)
    written = ["pass_rate.png"]
    if steps:
        figure, axes = plt.subplots(figsize=(6.4, 3.6))
        for name in ("loss", "kl", "rewards/margins"):
            points = [(m["step"], m[name]) for m in steps if m.get(name) is not None]
            if points:
                axes.plot(*zip(*points), marker="o" if len(points) <= 60 else None, markersize=3, label=name)
        for m in steps[1:]:
            if m["round"] != steps[m["step"] - 2]["round"]:
                axes.axvline(m["step"] - 0.5, color="grey", alpha=0.3)  # a round starts
        axes.set(title="KTO metrics, every step of every round", xlabel="step (all rounds)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(folder, "kto_metrics.png"), dpi=110)
        plt.close(figure)
        written.append("kto_metrics.png")
    return written


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(run_dir: str, rounds: list[dict], plots: list[str]) -> str:
    lines = [f"# Online KTO run `{os.path.basename(os.path.abspath(run_dir))}`", "",
             "| round | status | held-out pass rate | samples' pass rate | desirable | undesirable | quarantined | "
             "loss | kl | rewards/margins | seconds: " + " / ".join(t[:-2] for t in TIMINGS) + " |",
             "| --- " * 11 + "|"]
    for r in rounds:
        counts, metrics, timings = r["counts"] or {}, r["metrics"] or {}, r["timings"] or {}
        cells = [r["round"], r["status"], (r["held_out"] or {}).get("pass_rate"),
                 counts.get("pass_rate") if r["round"] else None, counts.get("desirable"), counts.get("undesirable"),
                 counts.get("quarantined"), metrics.get("loss"), metrics.get("kl"), metrics.get("rewards/margins"),
                 " / ".join(_number(timings.get(t), 1) for t in TIMINGS)]
        lines.append("| " + " | ".join(_number(c) if not isinstance(c, str) else c for c in cells) + " |")
    skipped = [r for r in rounds if r["reason"]]
    lines += [""] + [f"Round {r['round']} {r['status']}: {r['reason']}" for r in skipped]
    lines += [""] + [f"![{file}]({file})" for file in plots]
    return "\n".join(lines) + "\n"


def round_table(rounds: list[dict]) -> str:
    """The per-round table `launch.py online` prints (loop.Rounds.table's rows)."""
    lines = ["round  status   held-out pass  samples pass  desirable  undesirable  loss     seconds: "
             + "/".join(t[:-2] for t in TIMINGS)]
    for row in rounds:
        seconds = "/".join(_number((row["timings"] or {}).get(t), 1) for t in TIMINGS)
        lines.append(f"{row['round']:>5}  {row['status']:<8} {_number(row['pass_rate']):>13}  "
                     f"{_number(row['train_pass_rate']):>12}  {_number(row['desirable']):>9}  "
                     f"{_number(row['undesirable']):>11}  {_number(row['loss']):<7}  {seconds}")
    return "\n".join(lines)

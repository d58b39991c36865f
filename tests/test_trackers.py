"""Rank 0's metric record without Ray: metrics.jsonl keeps every step, the trackers get every
training.logging_steps-th step, the last, and every step with eval/ metrics."""

import json

from pipeline.config import load_config
from pipeline.train.trackers import MetricsLog


def test_logging_steps_thin_the_trackers_not_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, (f"output.output_dir={tmp_path}", "output.run_name=run",
                                "training.logging_steps=3", "output.report_to=[tensorboard]"))
    (tmp_path / "run").mkdir()
    log = MetricsLog(config, history=[], start_step=0, total_steps=7, tracking_ids={})
    for step in range(1, 8):
        metrics = {"step": step, "loss": 1.0 / step, **({"eval/loss": 0.5} if step == 4 else {})}
        log.write(json.dumps(metrics) + "\n", metrics)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6, 7]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 4, 6, 7]  # every 3rd, the eval step, the last
    assert [e.step for e in events.Scalars("eval/loss")] == [4]

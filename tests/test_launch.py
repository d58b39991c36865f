"""launch.py's command table and exit codes, without running a command."""

import os
import re

import launch
from conftest import ROOT


def test_every_command_has_a_function_and_every_exit_code_is_in_the_readme():
    parser_commands = {"train", "precompute", "validate", "submit", "status", "logs", "stop", "report", "config",
                       "retrain", "schedule", "history", "cache", "plan", "online"}
    assert set(launch.COMMANDS) == parser_commands
    for command in parser_commands - {"status", "logs", "stop", "report"}:
        assert launch.parse_args([command, *(["show"] if command == "config" else []),
                                  *(["list"] if command == "cache" else []),
                                  *(["--cron", "* * * * *"] if command == "schedule" else [])]).command == command
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.MULTILINE))
    assert set(map(int, table)) == {int(code) for code in launch.Exit}, table


def test_the_embedded_ray_train_settings_hold_for_the_fit_call_only(monkeypatch):
    from pipeline.fit import EMBEDDED_RAY_TRAIN, environment

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")  # the user's own value stays
    with environment(EMBEDDED_RAY_TRAIN):
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # (a later subprocess does not inherit it)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7"

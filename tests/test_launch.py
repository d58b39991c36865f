"""launch.py's command table and exit codes, without running a command."""

import os
import re

import launch
from conftest import ROOT


def test_every_command_has_a_function_and_every_exit_code_is_in_the_readme():
    parser_commands = {"train", "precompute", "validate", "submit", "status", "logs", "stop", "report", "config",
                       "retrain", "schedule", "history", "cache", "plan"}
    assert set(launch.COMMANDS) == parser_commands
    for command in parser_commands - {"status", "logs", "stop", "report"}:
        assert launch.parse_args([command, *(["show"] if command == "config" else []),
                                  *(["list"] if command == "cache" else []),
                                  *(["--cron", "* * * * *"] if command == "schedule" else [])]).command == command
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.MULTILINE))
    assert set(map(int, table)) == {int(code) for code in launch.Exit}, table

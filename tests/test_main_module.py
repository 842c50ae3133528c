"""``python -m anomalib_mvfa`` runs the ``anomalib-mvfa`` command line."""

from __future__ import annotations

import subprocess
import sys

from anomalib_mvfa.commands import COMMANDS, console


def _module(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomalib_mvfa", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_python_dash_m_lists_the_commands_of_the_console_script() -> None:
    result = _module("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: anomalib-mvfa")
    for name in COMMANDS:
        assert name in result.stdout


def test_python_dash_m_runs_a_command_as_the_console_script_does(tmp_path, capsys) -> None:
    assert console(["configs"]) == 0
    result = _module("configs")
    assert result.returncode == 0, result.stderr
    assert result.stdout == capsys.readouterr().out
    assert console(["configs", "--dest", str(tmp_path)]) == 0
    result = _module("configs", "--dest", str(tmp_path))  # copied already: the console's one-line error
    assert result.returncode == 2
    assert result.stderr.startswith("anomalib-mvfa: error:")
    assert "Traceback" not in result.stderr

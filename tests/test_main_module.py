"""``python -m anomalib_mvfa`` runs the ``anomalib-mvfa`` command line; what the command line leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from anomalib_mvfa.commands import COMMANDS, console, main


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


def test_a_reader_that_went_away_is_no_internal_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `anomalib-mvfa configs | head -0`: nobody reads the output
    try:
        command = [sys.executable, "-m", "anomalib_mvfa", "configs"]
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


def test_a_command_leaves_the_callers_warning_filters_as_they_were(capsys) -> None:
    before = list(warnings.filters)
    assert main(["configs"]) == 0
    assert warnings.filters == before
    assert capsys.readouterr().out

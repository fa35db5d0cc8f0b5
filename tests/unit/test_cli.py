"""The command-line layer without the stack: a closed output pipe, argument ranges, usage
and help texts, configuration checked by every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, close_stdout: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRM_ERP_SYNC_")}
    argv = [sys.executable, "-m", "service.cli", *args]
    if not close_stdout:
        return subprocess.run(argv, cwd=REPO, env={**clean, **env}, capture_output=True,
                              text=True, timeout=60, check=False)
    # The reader goes away before the command writes (`| head` that already has its lines).
    with subprocess.Popen(argv, cwd=REPO, env={**clean, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    return subprocess.CompletedProcess(argv, code, "", err)


def test_a_closed_output_pipe_ends_the_command_quietly() -> None:
    done = run("config", close_stdout=True)
    assert done.returncode == 141, done.stderr
    assert "unexpected_error" not in done.stderr
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr
    assert run("config", "--json").returncode == 0  # an open pipe: as before
    assert json.loads(run("config", "--json").stdout)

""".ci/run removes the virtual environment it creates, and keeps one the user names in CI_VENV.

The script runs for real, with stand-ins on PATH: a ``python3`` whose ``-m venv DIR`` writes a
tiny ``DIR/bin`` of stand-in ``python``, ``ruff`` and ``mypy`` commands that exit with
``$FAKE_RC`` (0: every CI step passes; 1: the first pip install fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_PYTHON3 = """#!/usr/bin/env bash
# Stand-in for `python3 -m venv DIR`: a bin/ folder whose tools exit with $FAKE_RC.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf 'export PATH="%s/bin:$PATH"\\n' "$3" > "$3/bin/activate"
    for tool in python ruff mypy; do
        printf '#!/usr/bin/env bash\\nsleep "${FAKE_SLEEP:-0}"\\nexit "${FAKE_RC:-0}"\\n' \\
            > "$3/bin/$tool"
        chmod +x "$3/bin/$tool"
    done
    head -c 100000 /dev/zero > "$3/payload"
    exit 0
fi
exit 1
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    fake_bin = tmp_path / "fake_bin"
    fake_bin.mkdir(exist_ok=True)
    python3 = fake_bin / "python3"
    python3.write_text(FAKE_PYTHON3)
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CI_VENV"}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", TMPDIR=str(tmpdir), **extra)
    return env


@pytest.mark.parametrize("rc", ["0", "1"])
def test_ci_run_removes_its_temporary_venv(tmp_path, rc):
    env = _env(tmp_path, FAKE_RC=rc)
    proc = subprocess.run(
        ["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == int(rc), proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ci_run_removes_its_temporary_venv_when_interrupted(tmp_path, sig):
    env = _env(tmp_path, FAKE_RC="0", FAKE_SLEEP="30")
    proc = subprocess.Popen(["bash", str(CI_RUN)], env=env, start_new_session=True)
    tmpdir = tmp_path / "tmp"
    deadline = time.monotonic() + 30
    while not list(tmpdir.glob("*/venv/payload")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmpdir.glob("*/venv/payload")), "the script never created its environment"
    os.killpg(proc.pid, sig)  # as Ctrl-C does, to the whole process group
    assert proc.wait(timeout=30) != 0
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("rc", ["0", "1"])
def test_ci_run_keeps_a_user_venv(tmp_path, rc):
    venv = tmp_path / "my venv"
    env = _env(tmp_path, FAKE_RC=rc, CI_VENV=str(venv))
    proc = subprocess.run(
        ["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == int(rc), proc.stderr
    assert (venv / "payload").exists()
    assert list((tmp_path / "tmp").iterdir()) == []

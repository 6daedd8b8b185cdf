"""Shared helpers for the tests: configs of the shipped files at tiny settings, subprocesses."""

import importlib
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("simco", "simmoco", "mocov2")
# How long a test waits for a subprocess or a condition before it gives up. Only a hang should
# ever reach it: a cold XLA cache on a loaded 2-core machine makes a smoke run take minutes, so it
# is generous, and it can be raised further on slower machines.
DEADLINE_S = float(os.environ.get("SIMCO_TEST_DEADLINE_S", "1800"))


def framework_config(framework: str, variant: str = "smoke", **overrides):
    config = importlib.import_module(f"configs.{framework}_cifar").get_config(variant)
    config.update(overrides)
    return config


def tail(text_or_path, chars=4000) -> str:
    """The end of a log (a path) or of captured output (a str or bytes)."""
    if isinstance(text_or_path, str | os.PathLike) and os.path.isfile(text_or_path):
        with open(text_or_path, errors="replace") as f:
            text = f.read()
    elif isinstance(text_or_path, bytes):
        text = text_or_path.decode(errors="replace")
    else:
        text = text_or_path or ""
    return text[-chars:] if text.strip() else "(no output)"


def run_python(args, *, env_extra=None, timeout=None, check=True, **kwargs):
    """Runs `python args...` from the repo root in a fresh interpreter (own XLA flags, signals)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    timeout = DEADLINE_S if timeout is None else timeout
    try:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired as error:  # killed; what it printed until then is kept
        pytest.fail(
            f"{args} still running after {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n"
            f"{tail(error.stdout)}\n{tail(error.stderr)}",
            pytrace=False,
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def wait(process, log_path, timeout=None) -> int:
    """The exit status of a subprocess writing to `log_path`; fails with the log's tail if the
    process is still running after `timeout` (default DEADLINE_S)."""
    timeout = DEADLINE_S if timeout is None else timeout
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{process.args} still running after {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n"
            f"{tail(log_path)}",
            pytrace=False,
        )


def wait_until(condition, processes, what, timeout=None) -> None:
    """Polls `condition()` until it holds. `processes` are (process, log_path) pairs that must keep
    running meanwhile: one that exits first fails the test with its log's tail."""
    timeout = DEADLINE_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for process, log_path in processes:
            if process.poll() is not None:
                pytest.fail(
                    f"{process.args} exited ({process.returncode}) before {what}:\n"
                    f"{tail(log_path)}",
                    pytrace=False,
                )
        time.sleep(0.05)
    logs = "\n".join(tail(log_path) for _, log_path in processes)
    pytest.fail(f"no {what} within {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n{logs}", pytrace=False)

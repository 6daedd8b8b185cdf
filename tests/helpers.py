"""Shared helpers for the tests: configs of the shipped files at tiny settings."""

import importlib
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("simco", "simmoco", "mocov2")


def framework_config(framework: str, variant: str = "smoke", **overrides):
    config = importlib.import_module(f"configs.{framework}_cifar").get_config(variant)
    config.update(overrides)
    return config


def run_python(args, *, env_extra=None, timeout=600, check=True, **kwargs):
    """Runs `python args...` from the repo root in a fresh interpreter (own XLA flags, signals)."""
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result

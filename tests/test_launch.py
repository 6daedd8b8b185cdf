"""launch.py's command line: every malformed --config. override is one line and exit 2."""

import importlib
import re
import sys

import pytest
from helpers import run_python

SMOKE = "--config=configs/simco_cifar.py:smoke"


@pytest.fixture(scope="module")
def launch():
    """launch.py as a module (its flags are defined on import; nothing here parses them)."""
    argv, sys.argv = sys.argv, ["launch.py"]
    try:
        return importlib.import_module("launch")
    finally:
        sys.argv = argv


def _argv(*overrides, config=SMOKE):
    return ["launch.py", config, "--workdir=unused", *overrides]


@pytest.mark.parametrize(
    "overrides, message",
    [
        # absl would read these silently (the last value wins) or misread them.
        (["--config.lr=0.1", "--config.lr=0.2"], r"^--config.lr is given 2 times; give each"),
        (["--config.lr=0.1", "--config.lr", "0.2"], r"^--config.lr is given 2 times"),
        (["--noconfig.symmetric"], r"^--noconfig.symmetric: write --config.symmetric=False"),
        (["--config.=3"], r"^--config.=3 names no key; write --config.KEY=VALUE$"),
        (["--config.evals..type=knn"], r"^--config.evals..type=knn names no key"),
    ],
)
def test_arguments_absl_would_misread_are_named(launch, overrides, message):
    assert re.search(message, launch._argument_error(_argv(*overrides)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--config.temprature=0.2", "--config.fo=1"],
            r"^unknown config keys --config.temprature \(did you mean --config.temperature\?\), "
            r"--config.fo; the keys: base_config\(\) in simco_jax/config.py$",
        ),
        (
            ["--config.evals.probe.every_epoch=2"],
            r"^unknown config key --config.evals.probe.every_epoch \(did you mean "
            r"--config.evals.probe.every_epochs\?\)",
        ),
        (
            ["--config.evals.prob.every_steps=2"],
            r"^unknown config key --config.evals.prob \(did you mean --config.evals.probe\?\)",
        ),
        (
            ["--config.evals.mine.type=knn"],
            r"^unknown config key --config.evals.mine \(--config.evals holds knn, probe\)",
        ),
        (
            ["--config.batch_size.x=1"],
            r"^--config.batch_size.x=1: batch_size is a value \(int\), not a group of keys$",
        ),
        (
            ["--config.evals.knn.type.x=1"],
            r"^--config.evals.knn.type.x=1: evals.knn.type is a value \(str\), not a group",
        ),
    ],
)
def test_paths_that_are_not_in_the_config_are_named(launch, overrides, message):
    line = launch._path_error(_argv(*overrides))
    assert re.search(message, line) and len(line) < 250, line


def test_the_linear_evaluations_keys_are_its_own(launch):
    line = launch._path_error(
        _argv("--config.pretrain=x", config="--config=configs/linear_eval.py")
    )
    assert line == (
        "unknown config key --config.pretrain (did you mean --config.pretrained?); the keys: "
        "default_config() in simco_jax/linear_eval.py"
    )


def test_valid_overrides_have_no_path_error(launch):
    assert launch._path_error(_argv("--config.evals.knn.every_steps=3", "--config.lr=1")) is None
    assert launch._argument_error(_argv("--config.evals.knn.every_steps=3")) is None


def test_a_config_files_error_is_its_message_on_one_line(launch):
    message = (
        "flag --config=configs/simco_cifar.py:smok: Error whilst parsing config file:\n\n"
        "Traceback (most recent call last):\n  File ...\n"
        "simco_jax.domains.ConfigError: unknown config variant 'smok'; known: smoke\n"
    )
    assert launch._one_line(message) == (
        "flag --config=configs/simco_cifar.py:smok: unknown config variant 'smok'; known: smoke"
    )


def test_a_period_given_in_one_spelling_replaces_the_files_other(tmp_path):
    """The smoke config sets log_every_steps=4 and every_steps of no eval: the user's epochs
    replace the file's steps; a period the user left alone keeps the file's value."""
    code = (
        "import sys; sys.argv = sys.argv[1:]\n"
        "import launch\n"
        "launch.parse_flags(sys.argv)\n"
        "c = launch._CONFIG.value\n"
        "print(c.log_every_steps, c.log_every_epochs, c.checkpoint_every_steps,"
        " c.evals.knn.every_steps, c.evals.knn.every_epochs)\n"
    )
    overrides = ["--config.log_every_epochs=1", "--config.evals.knn.every_epochs=0.5"]
    result = run_python(["-c", code, *_argv(*overrides)])
    assert result.stdout.split()[-5:] == ["None", "1.0", "8", "None", "0.5"], result.stdout


# One end-to-end case per family: through launch.py, one line `error: ...`, exit 2, nothing made.
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.batch_size.x=1"], "batch_size is a value (int), not a group of keys"),  # path
        (["--config.evals.probe.typo=1"], "did you mean --config.evals.probe.type?"),  # nested
        (["--config.dataset="], "dataset must be a non-empty string, got ''"),  # empty value
        (["--config.seed=1", "--config.seed=2"], "--config.seed is given 2 times"),  # repeated
        (["--config.temperature=1e39"], "temperature must be a finite float32 >= "),  # float32
    ],
    ids=["path into a value", "unknown nested key", "empty value", "repeated", "float32"],
)
def test_malformed_overrides_are_one_line_and_exit_2(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    result = run_python(_argv(*overrides)[:2] + [f"--workdir={workdir}", *overrides], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-3000:]
    assert not workdir.exists()

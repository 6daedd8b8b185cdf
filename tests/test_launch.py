"""launch.py: every expected user error is one line `error: <message>` and exit 2, before
anything is created or compiled; --verbose adds the traceback."""

import re

import pytest
from helpers import run_python


# One end-to-end case per way launch.py turns an error into one line: an unknown --config.KEY
# (with and without a close match), a flag that does not parse (here a config file whose loading
# raised: a traceback inside the flag error), and a config file that cannot be read. The errors the
# run raises (bad config values, data, checkpoints) take one path, tested below with --verbose;
# their messages are unit tests of the function that raises them (test_config.py, test_data.py).
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config.temprature=0.2", "--config.foo=1"],
            r"unknown config key\(s\) \['temprature', 'foo'\]; did you mean "
            r"\['--config.temperature'\]\? Known keys: \['backbone'",
        ),
        (["--config=configs/simco_cifar.py:smok"], "unknown config variant 'smok'"),
        # A config path typo: one line, not two chained tracebacks.
        (
            ["--config=configs/simco_cifr.py"],
            r"cannot load --config: .*No such file or directory: .*configs/simco_cifr.py",
        ),
    ],
)
def test_launch_rejects_bad_flags_before_compiling(flags, message, tmp_path):
    workdir = tmp_path / "run"
    args = ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", *flags]
    result = run_python(args, check=False, timeout=1800)
    # One line `error: <message>`, exit 2, no traceback (that is for --verbose).
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    # Nothing was created, let alone compiled: the check runs before the workdir is made.
    assert not workdir.exists()


def test_launch_expected_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
    args = [
        "launch.py",
        "--config=configs/simco_cifar.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=npz",
        f"--config.data_path={tmp_path / 'notes.npz'}",
    ]
    (tmp_path / "notes.npz").write_text("hello")
    quiet = run_python(args, check=False, timeout=1800)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    line = quiet.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: '.*notes.npz' is not an npz archive \(it is a file .*", line)
    verbose = run_python([*args, "--verbose"], check=False, timeout=1800)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert "simco_jax.data.DataError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == line

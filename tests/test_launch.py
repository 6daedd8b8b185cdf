"""launch.py end to end: a fault or a stop ends in one line, a failed start leaves nothing, and
every malformed --config. override is one line and exit 2.

Only what is end to end runs here (the output of the whole process); the mechanisms have unit
tests in test_workdir.py, test_writers.py and test_checkpointing.py.
"""

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import REPO, framework_config, run_python, wait, wait_until

from simco_jax import workdir as workdir_lib
from simco_jax import writers

# A run far longer than any test waits for: the test stops it.
LONG = dict(
    max_epochs=1000, checkpoint_every_steps=10_000, eval_every_epochs=1000, knn_every_epochs=0
)
# What Orbax logs for a read-only manager (it reads like a permissions problem).
READ_ONLY_WARNINGS = ("setting save_interval_steps=0", "setting create=False", "is read only")


def _args(workdir, **overrides):
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", *flags]


@contextlib.contextmanager
def _launched(args, log_path):
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _logged(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and os.path.getsize(path) > 0


def test_ctrl_c_prints_one_line(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    with _launched(_args(workdir, **LONG), log) as run:
        wait_until(lambda: _logged(workdir), [(run, log)], "the first metrics")
        run.send_signal(signal.SIGINT)
        assert wait(run, log) == 130
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    said = [line for line in output.splitlines() if "Ctrl-C" in line]
    assert len(said) == 1 and said[0].endswith(
        "Ctrl-C: stopping after the current steps with a checkpoint (rerun the same command to "
        "resume); press Ctrl-C again to abort"
    ), output[-3000:]
    assert os.listdir(workdir / "checkpoints")  # and it did checkpoint


def test_a_disk_that_fills_during_training_ends_in_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    workdir, log = small / "run", tmp_path / "run.log"
    try:
        with _launched(_args(workdir, log_every_steps=1, **LONG), log) as run:
            wait_until(lambda: _logged(workdir), [(run, log)], "the first metrics")
            with contextlib.suppress(OSError), open(small / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 65536)
            assert wait(run, log) == 2
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    output = log.read_text()
    assert "Traceback" not in output and "During handling" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        f"error: cannot write the metrics to {workdir}: No space left on device. The checkpoints "
        "already there are intact; free space or fix the permissions, then rerun the same "
        "command to resume."
    )


def test_a_refused_start_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "runs" / "new"
    missing = tmp_path / "missing.npz"
    result = run_python(_args(workdir, dataset="npz", data_path=missing), check=False, timeout=1800)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert os.listdir(tmp_path) == []  # neither the workdir nor `runs`


def test_a_checkpoints_file_is_refused_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    result = run_python(_args(workdir), check=False, timeout=1800)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {workdir / 'checkpoints'} is not a directory; the checkpoints go there. Move it "
        "away, or use another --workdir."
    ]


def _flip_a_byte_in_the_data(directory):
    for root, _, files in os.walk(directory):
        if os.path.basename(root) == "d":  # OCDBT data files; the metadata stays readable
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.seek(os.path.getsize(f.name) // 2)
                    byte = f.read(1)
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([byte[0] ^ 0xFF]))


def test_a_resume_over_a_damaged_checkpoint_says_one_line_and_no_library_noise(tmp_path):
    workdir = tmp_path / "run"
    run_python(_args(workdir, max_steps=4, checkpoint_every_steps=2), timeout=1800)
    _flip_a_byte_in_the_data(workdir / "checkpoints" / "4" / "state")
    result = run_python(_args(workdir, max_steps=6, checkpoint_every_steps=2), timeout=1800)
    output = result.stdout + result.stderr
    assert not [w for w in READ_ONLY_WARNINGS if w in output], output[-3000:]
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
    warned = [line for line in output.splitlines() if "checkpoint at step 4" in line]
    assert len(warned) == 1 and "falling back to the previous one" in warned[0], output[-3000:]
    assert "resumed at step 2" in output
    assert max(r["step"] for r in writers.read_metrics(str(workdir))) == 6


def test_a_full_disk_anywhere_is_one_line(tmp_path):
    # Writes that name their own error (checkpoints, metrics) have their tests; any other write
    # that meets a full disk (the config record, the lock) goes through launch.py's funnel.
    script = (
        "import errno, sys\n"
        "from absl import app\n"
        "import launch\n"
        "def full(config, workdir):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', workdir + '/config.json')\n"
        "launch.train.train_and_evaluate = full\n"
        f"sys.argv = {_args(tmp_path / 'run')!r}\n"
        "app.run(launch.main, flags_parser=launch.parse_flags)\n"
    )
    result = run_python(["-c", script], check=False, timeout=1800)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: No space left on device writing {tmp_path / 'run'}/config.json. The "
        "checkpoints already there are intact; free space, then rerun the same command to resume."
    ]


def test_a_linear_evaluation_of_a_run_without_checkpoints_is_one_line(tmp_path):
    pretrained = tmp_path / "pretrained"
    (pretrained / "checkpoints").mkdir(parents=True)
    workdir_lib.write_config(str(pretrained), framework_config("simco"), 0)
    args = [
        "launch.py",
        "--config=configs/linear_eval.py",
        f"--config.pretrained={pretrained}",
        f"--workdir={tmp_path / 'linear'}",
    ]
    result = run_python(args, check=False, timeout=1800)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # no thread traceback


# ----------------------------------------- every malformed --config. override: one line, exit 2

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


# ------------------------------------------------------------ launch.py: every expected user
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
            r"unknown config keys --config.temprature \(did you mean --config.temperature\?\), "
            r"--config.foo; the keys: base_config\(\) in",
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

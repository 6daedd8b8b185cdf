"""Reliability: bad input fails early with the fix in the message, faults lose nothing, and the
same config and seed give the same bits.

One uninterrupted reference run (module fixture) is what every fault must end equal to: a run
preempted with SIGTERM, then killed with SIGKILL mid-run, then resumed; and a run resumed over
corrupted and partially written checkpoints. All runs share one config (one compilation, cached).
"""

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import DEADLINE_S, REPO, framework_config, run_python

from simco_jax import checkpointing, data, train, writers
from simco_jax import config as config_lib

# 256 images / batch 32 = 8 steps per epoch, 32 steps; a checkpoint every 4 steps, all kept.
OVERRIDES = dict(max_epochs=4, checkpoint_every_steps=4, keep_checkpoints=100)
TOTAL_STEPS = 32
TIMING_KEYS = ("images_per_s", "eta_s")  # wall-clock measurements: the only metrics that differ


def _config(**overrides):
    return framework_config("simco", "smoke", **{**OVERRIDES, **overrides})


def _launch_args(workdir, **overrides):
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
    return ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", *flags]


def _steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _saved_state(workdir, step=None):
    """A checkpoint's state as a tree of NumPy arrays, read with plain Orbax (no template)."""
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), item_names=("state", "record")
    )
    try:
        step = manager.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        return manager.restore(step, args=args)["state"]
    finally:
        manager.close()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _metric_records(workdir):
    records = writers.read_metrics(str(workdir))
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its workdir and final in-memory state."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train.train_and_evaluate(_config(), str(workdir))
    assert summary["step"] == TOTAL_STEPS and _steps(workdir) == list(range(4, 33, 4))
    return workdir, summary["state"]


# ---------------------------------------------------------------------------------------------
# Bad input fails early, with the fix in the message.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(momentum=1.5), r"momentum must lie in \[0, 1\], got 1.5"),
        (dict(momentum=-0.1), r"momentum must lie in \[0, 1\], got -0.1"),
        (dict(temperature=-0.1), "temperature must be > 0, got -0.1"),
        (dict(dt_m=0.0), "dt_m must be > 0, got 0.0"),
        (dict(temperature=float("nan")), "temperature must be > 0, got nan"),
        (dict(queue_size=48), "queue_size=48 must be a multiple of the global batch_size=32"),
    ],
)
def test_bad_values_fail_before_the_workdir_is_touched(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(_config(**overrides), str(workdir))
    assert not workdir.exists()


def test_unknown_key_fails_through_train_and_evaluate(tmp_path):
    config = _config()
    config.unlock()
    config.lr_warmup = 5
    with pytest.raises(config_lib.ConfigError, match=r"unknown config keys \['lr_warmup'\]"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "flag, env, message",
    [
        (
            "--config.temprature=0.2",
            {},
            r"unknown config key\(s\) \['temprature'\]; did you mean \['--config.temperature'\]",
        ),
        ("--config.foo=1", {}, r"unknown config key\(s\) \['foo'\]. Known keys: \['backbone'"),
        ("--config.batch_size=abc", {}, "flag --config.batch_size=abc: invalid literal for int"),
        (
            "--config.batch_size=30",
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
            "batch_size=30 is not divisible by the 8 devices; use a multiple of 8",
        ),
    ],
)
def test_launch_rejects_bad_flags_before_compiling(flag, env, message, tmp_path):
    workdir = tmp_path / "run"
    result = run_python(
        ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", flag],
        env_extra=env,
        check=False,
    )
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    # Flag errors are one line; a config error ends its traceback with the message, not XLA's.
    last_line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr or last_line.startswith("simco_jax.config.ConfigError")
    # Nothing was created, let alone compiled: the check runs before the workdir is made.
    assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    message = r"cannot write to --workdir=.*a_file/run' \(Not a directory\); pass a writable"
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(_config(), str(blocker / "run"))


def _write_npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = dict(
        train_images=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 5, 64),
        test_images=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 5, 16),
    )
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(test_labels=None), r"lacks the keys \['test_labels'\]"),
        (dict(train_images=np.zeros((64, 16, 16, 3), np.float32)), "must be uint8"),
        (dict(train_images=np.zeros((64, 3, 16, 16), np.uint8)), r"np.transpose\(x, \(0, 2, 3, 1"),
        (dict(class_names=np.array(["a", "b"])), r"labels must lie in \[0, 2\)"),
        (dict(train_labels=np.arange(64) - 1), "class indices must be non-negative"),
        (
            dict(train_images=np.zeros((20, 16, 16, 3), np.uint8), train_labels=np.zeros(20, int)),
            r"20 training images are fewer than one batch \(batch_size=32\)",
        ),
    ],
)
def test_bad_npz_fails_before_compiling(changes, message, tmp_path):
    path = tmp_path / "arrays.npz"
    _write_npz(path, **changes)
    workdir = tmp_path / "run"
    config = _config(dataset="npz", data_path=str(path))
    with pytest.raises(data.DataError, match=message):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").exists()  # failed before the state was built


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset="cifar1000"), r"unknown dataset 'cifar1000'. Did you mean"),
        (
            dict(dataset="cifar10", tfds_download=False),
            "tfds dataset 'cifar10' is not prepared .* forbids downloading it",
        ),
    ],
)
def test_unknown_or_unprepared_dataset(overrides, message, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = _config(data_dir=str(tmp_path / "tfds"), **overrides)
    with pytest.raises(data.DataError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_checkpoint_of_another_model_is_refused(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", workdir / "checkpoints")
    config = _config(backbone_width=8, queue_size=64)
    expected = (
        r"step 32\) of an incompatible config \(backbone_width: 4 in the checkpoint, 8 now, "
        r"queue_size: 0 in the checkpoint, 64 now\). Use a fresh --workdir"
    )
    with pytest.raises(checkpointing.CheckpointError, match=expected):
        train.train_and_evaluate(config, str(workdir))
    assert _steps(workdir) == list(range(4, 33, 4))  # nothing was overwritten


# ---------------------------------------------------------------------------------------------
# Faults lose nothing.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _launched(args, log_path):
    """A launch.py child writing to `log_path`; always killed and reaped on the way out."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)


def _wait_until(condition, process, log_path, what):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            output = open(log_path).read()[-3000:]
            raise AssertionError(f"exited ({process.returncode}) before {what}:\n{output}")
        time.sleep(0.01)
    raise AssertionError(f"no {what} within {DEADLINE_S:.0f} s (SIMCO_TEST_DEADLINE_S)")


def test_sigterm_then_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"

    # 1. Preemption: SIGTERM once training runs. No periodic checkpoints in this leg, so the
    #    checkpoint that exists afterwards is the one written on the way out.
    log1 = tmp_path / "leg1.log"
    with _launched(_launch_args(workdir, checkpoint_every_steps=1000), log1) as process:
        _wait_until(lambda: metrics.exists() and metrics.stat().st_size, process, log1, "metrics")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 143
    output = log1.read_text()
    assert "fresh start" in output
    reached = int(re.search(r"preempted: saved the checkpoint of step (\d+)/32", output)[1])
    assert 4 <= reached < TOTAL_STEPS and _steps(workdir) == [reached]
    assert int(_saved_state(workdir)["step"]) == reached

    # 2. Resume it, then SIGKILL right after its first mid-epoch checkpoint (step 4 of the 8 of
    #    an epoch), while it trains on: no chance to clean up.
    log2 = tmp_path / "leg2.log"
    with _launched(_launch_args(workdir), log2) as process:

        def mid_epoch_checkpoint():
            return any(s > reached and s % 8 == 4 for s in _steps(workdir))

        _wait_until(mid_epoch_checkpoint, process, log2, "a mid-epoch checkpoint")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    assert f"resumed at step {reached}" in log2.read_text()
    last = _steps(workdir)[-1]
    assert last % 8 == 4 and last < TOTAL_STEPS, f"killed after step {last}, not mid-epoch"
    leftovers = [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]

    # 3. Resume to the end, here: from the last complete checkpoint, to the reference's bits.
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(_config(), str(workdir))
    assert f"resumed at step {last}" in caplog.text
    assert summary["step"] == TOTAL_STEPS
    _assert_trees_equal(summary["state"], reference[1])
    _assert_trees_equal(_saved_state(workdir), _saved_state(reference[0]))
    # The metrics logged after the resume are the reference's, bit for bit.
    tail = [r for r in _metric_records(reference[0]) if r["step"] > last]
    assert _metric_records(workdir)[-len(tail) :] == tail
    # A save cut short by the kill (if any) was cleaned up, not restored.
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()], leftovers


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)


def _flip_a_byte_in_the_data(directory):
    flipped = 0
    for root, _, files in os.walk(directory):
        if os.path.basename(root) != "d":  # OCDBT data files; the metadata stays readable
            continue
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.seek(os.path.getsize(f.name) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
                flipped += 1
    assert flipped


# Orbax's failed async reads leave an asyncio callback on a closed loop: noise, not an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_partial_checkpoints_fall_back_with_a_warning(reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    ckpts = workdir / "checkpoints"
    # A crash while saving step 28 leaves Orbax's temporary dir; step 32 was never written.
    shutil.rmtree(ckpts / "32")
    os.rename(ckpts / "28", ckpts / "28.orbax-checkpoint-tmp")
    _truncate_files(ckpts / "24" / "state")  # a truncated checkpoint
    _flip_a_byte_in_the_data(ckpts / "20" / "state")  # silent bit rot, caught by checksums

    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(_config(), str(workdir))

    for step in (24, 20):
        assert re.search(
            rf"checkpoint at step {step} in .* cannot be read .* falling back to the previous",
            caplog.text,
        )
    assert "resumed at step 16" in caplog.text
    assert sorted(os.listdir(workdir / "unreadable_checkpoints"))[0].startswith("20_")
    assert len(os.listdir(workdir / "unreadable_checkpoints")) == 2  # set aside, not deleted
    assert sorted(os.listdir(ckpts), key=int) == [str(s) for s in range(4, 33, 4)]
    _assert_trees_equal(summary["state"], reference[1])
    _assert_trees_equal(_saved_state(workdir), _saved_state(reference[0]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30 after a warm-up epoch at warmup_start_lr: the loss explodes in the second epoch.
    config = _config(max_epochs=2, lr=1e30)
    workdir = tmp_path / "run"
    with pytest.raises(train.NonFiniteLossError) as raised:
        train.train_and_evaluate(config, str(workdir))
    match = re.search(
        r"non-finite by step (\d+); stopping without checkpointing \(the last good checkpoint, "
        r"step (\d+), is intact\). Lower lr",
        str(raised.value),
    )
    assert match, str(raised.value)
    bad_step, good_step = int(match[1]), int(match[2])
    steps = _steps(workdir)
    assert steps and steps[-1] == good_step < bad_step  # nothing saved at or after the NaN
    saved = _saved_state(workdir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved) if x.dtype.kind == "f")
    assert int(saved["step"]) == good_step
    losses = [r["loss"] for r in writers.read_metrics(str(workdir)) if "loss" in r]
    assert losses and np.all(np.isfinite(losses))  # the diverged chunk was never logged


def test_preemption_right_after_a_periodic_checkpoint_saves_once(tmp_path):
    # SIGTERM arriving in a chunk that ends on a checkpoint step asks for the same step twice;
    # Orbax alone would raise StepAlreadyExistsError on the way out and lose the exit code.
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    ckpt.save(4, {"w": np.zeros(3, np.float32)})
    ckpt.close()
    assert _steps(tmp_path) == [4]
    np.testing.assert_array_equal(_saved_state(tmp_path)["w"], np.ones(3, np.float32))


def test_state_check_before_saving_finds_any_non_finite_float_leaf():
    # The loss of step k is computed before update k: an update that overflows the parameters
    # shows in no loss yet, so `save` checks the whole state too, with this function.
    state = {"w": np.ones((3, 2), np.float32), "step": np.int32(7), "rng": jax.random.key(0)}
    assert bool(train._all_finite(state))
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = {**state, "w": state["w"].copy()}
        poisoned["w"][1, 0] = bad
        assert not bool(train._all_finite(poisoned))


# ---------------------------------------------------------------------------------------------
# Determinism.
# ---------------------------------------------------------------------------------------------


def test_same_config_and_seed_give_the_same_bits(reference, tmp_path):
    summary = train.train_and_evaluate(_config(), str(tmp_path / "again"))
    _assert_trees_equal(summary["state"], reference[1])
    again = _metric_records(tmp_path / "again")
    assert again == _metric_records(reference[0])
    assert any("knn_top1" in r for r in again) and any("loss" in r for r in again)
    for step in (4, 16, 32):  # intermediate checkpoints too, not only the end
        _assert_trees_equal(
            _saved_state(tmp_path / "again", step), _saved_state(reference[0], step)
        )

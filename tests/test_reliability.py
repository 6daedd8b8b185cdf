"""Reliability: bad input fails early with the fix in the message, faults lose nothing, and the
same config and seed give the same bits.

One uninterrupted reference run (module fixture) is what every fault must end equal to: a run
preempted with SIGTERM, then killed with SIGKILL mid-run, then resumed; and a run resumed over
corrupted and partially written checkpoints. All runs share one config (one compilation, cached).
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import DEADLINE_S, REPO, framework_config, run_python

from simco_jax import checkpointing, data, loop, sources, train, writers
from simco_jax import config as config_lib

# 256 images / batch 32 = 8 steps per epoch, 32 steps; a checkpoint every 4 steps, all kept.
OVERRIDES = dict(max_epochs=4, checkpoint_every_steps=4, keep_checkpoints=100)
TOTAL_STEPS = 32
TIMING_KEYS = ("images_per_s", "eta_s")  # wall-clock measurements: the only metrics that differ
LAUNCH_DEADLINE_S = 1800  # generous: a cold XLA cache on a loaded 2-core machine


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
        (dict(momentum=1.5), r"momentum must be a finite number in \[0, 1\), got 1.5"),
        (dict(momentum=-0.1), r"momentum must be a finite number in \[0, 1\), got -0.1"),
        (
            dict(temperature=-0.1),
            r"temperature must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got -0.1",
        ),
        (
            dict(dt_m=0.0),
            r"dt_m must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got 0.0",
        ),
        (
            dict(temperature=float("inf")),
            r"temperature must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got inf",
        ),
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
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key lr_warmup;"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (
            ["--config.temprature=0.2"],
            {},
            r"unknown config key --config.temprature \(did you mean --config.temperature\?\)",
        ),
        (["--config.foo=1"], {}, r"unknown config key --config.foo; the keys: base_config\(\) in"),
        (["--config.batch_size=abc"], {}, "flag --config.batch_size=abc: invalid literal for int"),
        (
            ["--config.batch_size=30"],
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
            "batch_size=30 is not divisible by the 8 devices; use a multiple of 8",
        ),
        (["--config.keep_checkpoints=0"], {}, "keep_checkpoints must be an integer >= 1, got 0"),
        (["--config.dataset=npz"], {}, "dataset='npz' needs --config.data_path="),
        # A config path typo: one line, not two chained tracebacks.
        (
            ["--config=configs/simco_cifr.py"],
            {},
            r"cannot load --config: .*No such file or directory: .*configs/simco_cifr.py",
        ),
        (["--config=configs/simco_cifar.py:smok"], {}, "unknown config variant 'smok'"),
    ],
)
def test_launch_rejects_bad_flags_before_compiling(flags, env, message, tmp_path):
    workdir = tmp_path / "run"
    args = ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", *flags]
    result = run_python(args, env_extra=env, check=False, timeout=1800)
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
    # The killed leg's lock was stale (its PID is gone) and was taken over.
    assert "took over the stale workdir lock" in caplog.text
    # Steps the killed leg logged past its checkpoint were re-run: one record each in the file.
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in raw if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == TOTAL_STEPS
    # One config per start, named by the step it started from.
    assert sorted(os.listdir(workdir / "configs")) == sorted(
        {"0.json", f"{reached}.json", f"{last}.json"}
    )


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


def _diverge_from(monkeypatch, metric, first_bad_step):
    """Makes the step report `metric` as NaN from `first_bad_step` on: a divergence on demand
    (the lr that would force one is now outside its domain)."""
    from simco_jax import train_step

    make = train_step.make_train_step

    def make_diverging(config, comps):
        step_fn = make(config, comps)

        def step(state, images, labels):
            new_state, metrics = step_fn(state, images, labels)
            bad = state.step >= first_bad_step
            return new_state, {**metrics, metric: jnp.where(bad, jnp.nan, metrics[metric])}

        return step

    monkeypatch.setattr(train_step, "make_train_step", make_diverging)


@pytest.mark.parametrize(
    "metric, first_bad_step, last_good",
    [
        ("loss", 9, "the last good checkpoint, step 8, is intact"),
        # The probe's loss is guarded too; before the first checkpoint no step is named.
        ("probe_loss", 1, "no checkpoint was written yet"),
    ],
)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    metric, first_bad_step, last_good, tmp_path, monkeypatch
):
    _diverge_from(monkeypatch, metric, first_bad_step)
    workdir = tmp_path / "run"
    with pytest.raises(loop.NonFiniteLossError) as raised:
        train.train_and_evaluate(_config(max_epochs=2), str(workdir))
    message = str(raised.value)
    match = re.fullmatch(
        rf"{metric} became non-finite by step (\d+); stopping without checkpointing "
        rf"\({last_good}\)\. Lower lr, classifier_lr or temperature, or use dtype=float32\.",
        message,
    )
    assert match, message
    assert "None" not in message
    steps = _steps(workdir)
    assert steps == ([4, 8] if metric == "loss" else [])  # nothing saved at or after the NaN
    if steps:
        saved = _saved_state(workdir)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved) if x.dtype.kind == "f")
        assert int(saved["step"]) == 8 < int(match[1])
    logged = [r[metric] for r in writers.read_metrics(str(workdir)) if metric in r]
    assert np.all(np.isfinite(logged))  # the diverged chunk was never logged


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
    assert bool(loop.all_finite(state))
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = {**state, "w": state["w"].copy()}
        poisoned["w"][1, 0] = bad
        assert not bool(loop.all_finite(poisoned))


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


# ---------------------------------------------------------------------------------------------
# The step against the official code.
# ---------------------------------------------------------------------------------------------


def _one_step_setup(config):
    from simco_jax import train_step

    dataset = sources.load_dataset(config)
    comps = train_step.build_components(config, dataset.num_classes, 8)
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    images = jnp.asarray(dataset.train_images[: config.batch_size])
    labels = jnp.asarray(dataset.train_labels[: config.batch_size], jnp.int32)
    return comps, state, images, labels


def test_the_whole_step_runs_under_x64():
    # The losses support float64; so must the step, the queue's ring buffer included (an int32
    # pointer met an int64 literal in dynamic_update_slice).
    from simco_jax import train_step

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        config = framework_config("mocov2", "smoke", queue_size=64)
        comps, state, images, labels = _one_step_setup(config)
        new_state, metrics = jax.jit(train_step.make_train_step(config, comps))(
            state, images, labels
        )
        assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
        new, old = new_state.method_state, state.method_state
        assert int(new["queue_ptr"]) == config.batch_size
        assert not np.array_equal(new["queue"][:32], old["queue"][:32])
        np.testing.assert_array_equal(new["queue"][32:], old["queue"][32:])
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_one_way_key_encoder_sees_both_views_as_the_official_code():
    # MoCo v2 / SimMoCo read only k2, but the official code runs the key encoder on both views:
    # its BatchNorm running statistics are those of view 1's pass followed by view 2's.
    from simco_jax import augment, methods, train_step

    config = framework_config("simmoco", "smoke")
    comps, state, images, labels = _one_step_setup(config)
    new_state, _ = jax.jit(train_step.make_train_step(config, comps))(state, images, labels)

    rng = jax.random.fold_in(jax.random.fold_in(state.rng, train_step._STEP_STREAM), state.step)
    view1, view2 = augment.two_views(jax.random.split(rng)[0], images, comps.aug)
    stats = state.method_state["momentum_batch_stats"]
    for view in (view1, view2):
        _, _, stats = methods.encode(
            comps.model, state.method_state["momentum_params"], stats, view
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new_state.method_state["momentum_batch_stats"],
        stats,
    )


# ---------------------------------------------------------------------------------------------
# A workdir belongs to one run; a rerun never damages it.
# ---------------------------------------------------------------------------------------------


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=600)
    return process.pid


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "lock.0")
    with open(path, "w") as f:
        json.dump({"since": "earlier", "token": "theirs", **holder}, f)
    return path


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    from simco_jax import workdir as workdir_lib

    host = socket.gethostname()
    held = workdir_lib.WorkdirLock(str(tmp_path))
    with pytest.raises(workdir_lib.WorkdirLockError) as raised:  # a second run, at once
        workdir_lib.WorkdirLock(str(tmp_path))
    assert re.fullmatch(
        rf"{tmp_path} is in use by another run: host {re.escape(host)}, PID {os.getpid()}, "
        r"since .* \(lock file .*lock\.0\)\. Wait for it to finish, or use another --workdir; "
        r"if that process is gone \(e\.g\. its host was lost\), delete the lock file\.",
        str(raised.value),
    )
    held.release()
    assert not os.path.exists(held.path)
    workdir_lib.WorkdirLock(str(tmp_path)).release()  # free again

    # A killed run's lock on this host: its PID is gone, so the lock is taken over.
    path = _write_lock(tmp_path, host=host, pid=_dead_pid(), pid_start_time="1")
    caplog.set_level(logging.WARNING, logger="simco_jax")
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    assert "took over the stale workdir lock" in caplog.text
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    # A PID reused by a newer process is not the holder either.
    _write_lock(tmp_path, host=host, pid=os.getpid(), pid_start_time="-1")
    workdir_lib.WorkdirLock(str(tmp_path)).release()

    # Another host: alive while it refreshes the file, stale once it stopped for long enough.
    path = _write_lock(tmp_path, host="node-7", pid=4242)
    with pytest.raises(workdir_lib.WorkdirLockError, match="host node-7, PID 4242"):
        workdir_lib.WorkdirLock(str(tmp_path))
    old = time.time() - workdir_lib.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    workdir_lib.WorkdirLock(str(tmp_path)).release()


def test_metrics_have_one_record_per_step_after_a_resume(tmp_path):
    # A run killed after logging steps 5-6 past its checkpoint of step 4 re-runs them.
    lines = [
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.5},
        {"step": 4, "probe_top1": 10.0},  # the evaluation at the same step
        {"step": 6, "loss": 9.9},  # re-run after the resume
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')  # cut short
    writer = writers.MetricWriter(str(tmp_path), resume_step=4)
    writer.write(6, {"loss": 1.0})
    writer.close()
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw == [*lines[:3], {"step": 6, "loss": 1.0}]  # truncated past the restored step
    assert writers.read_metrics(str(tmp_path)) == [
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.5, "probe_top1": 10.0},
        {"step": 6, "loss": 1.0},
    ]
    # Readers also merge a file written by an older version: the last value of a step wins.
    path.write_text("".join(json.dumps(r) + "\n" for r in [*lines, {"step": 6, "loss": 1.0}]))
    assert writers.read_metrics(str(tmp_path))[-1] == {"step": 6, "loss": 1.0}


def _no_data(monkeypatch):
    def load_dataset(config):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(sources, "load_dataset", load_dataset)


def test_resume_with_a_changed_batch_is_refused_before_any_data_and_touches_nothing(
    reference, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "32")  # a run with its schedule left to run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    _no_data(monkeypatch)
    for overrides, expected in [
        (
            dict(batch_size=64, seed=99),
            r"batch_size: 32 in the checkpoint, 64 now, seed: 15 in the checkpoint, 99 now",
        ),
        (
            dict(max_epochs=8),
            r"max_epochs: 4 in the checkpoint, 8 now \(the cosine schedule spans max_epochs, and ",
        ),
        (dict(lr=0.1, temperature=0.2), "temperature: 0.1 in the checkpoint, 0.2 now, lr: "),
        (dict(dataset="cifar10"), "dataset: 'synthetic' in the checkpoint, 'cifar10' now"),
    ]:
        with pytest.raises(checkpointing.CheckpointError) as raised:
            train.train_and_evaluate(_config(**overrides), str(workdir))
        message = str(raised.value)
        assert "\n" not in message and re.search(expected, message), message
        assert message.startswith(f"{workdir}/checkpoints holds a checkpoint (step 28) of an ")
    # config.json, configs/, checkpoints, metrics: byte for byte as they were; no lock left.
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_rerun_of_a_finished_run_says_so_at_once_with_its_final_metrics(
    reference, tmp_path, monkeypatch, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    _no_data(monkeypatch)  # nothing is loaded, let alone compiled
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(_config(), str(workdir))
    final = writers.read_metrics(str(reference[0]))[-1]
    assert summary["complete"] and summary["step"] == TOTAL_STEPS
    assert summary["probe_top1"] == final["probe_top1"] and summary["knn_top1"] == final["knn_top1"]
    assert re.search(
        rf"{workdir} is complete \(step 32 of 32\); nothing to do. Final metrics: .*"
        rf"probe_top1 {final['probe_top1']:.4g}",
        caplog.text,
    )
    # Accepted changes (periods, keep_checkpoints) do not make a finished run resumable either.
    summary = train.train_and_evaluate(_config(log_every_steps=2), str(workdir))
    assert summary["complete"]


def test_resume_accepts_and_logs_a_longer_max_steps(reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for step in (20, 24, 28, 32):  # killed after step 16's checkpoint, having logged up to 32
        shutil.rmtree(workdir / "checkpoints" / str(step))
    first_config = (workdir / "config.json").read_text()
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(_config(max_steps=24, keep_checkpoints=50), str(workdir))
    assert "resuming with changed keep_checkpoints 100 -> 50, max_steps -1 -> 24" in caplog.text
    assert summary["step"] == 24
    # One record per step in the file itself: past the restored step it was truncated, and
    # the re-run steps logged the reference's values again.
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in raw if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 24
    reference_records = {r["step"]: r for r in _metric_records(reference[0])}
    for record in _metric_records(workdir):
        if 16 < record["step"] < 24:  # step 24's evaluation comes with the new max_steps
            assert record == reference_records[record["step"]]
    # The config history: the first start's, and this start's.
    assert json.loads((workdir / "configs" / "16.json").read_text())["max_steps"] == 24
    assert json.loads((workdir / "config.json").read_text())["max_steps"] == 24
    assert json.loads((workdir / "configs" / "0.json").read_text()) == json.loads(first_config)


def test_checkpoint_record_names_the_data_and_accepts_a_moved_file(tmp_path):
    saved = {"batch_size": 32, "data_path": "/old/a.npz", "train_data": "64 images, crc32 1"}
    refused, accepted = checkpointing.changes(
        saved, {"batch_size": 32, "data_path": "/new/a.npz", "train_data": "64 images, crc32 1"}
    )
    assert refused == {} and accepted == {"data_path": ("/old/a.npz", "/new/a.npz")}
    refused, _ = checkpointing.changes(saved, {**saved, "train_data": "64 images, crc32 2"})
    assert refused == {"train_data": ("64 images, crc32 1", "64 images, crc32 2")}
    images = np.zeros((64, 4, 4, 3), np.uint8)
    labels = np.arange(64) % 4
    same = checkpointing.data_identity(images, labels)
    assert same == checkpointing.data_identity(images.copy(), labels.copy())
    assert same != checkpointing.data_identity(images, np.roll(labels, 1))
    # Every config key is compared unless it is declared resumable.
    resumable = checkpointing.RESUMABLE_KEYS
    assert resumable <= set(config_lib.base_config().keys())
    assert {"batch_size", "seed", "max_epochs", "lr", "dataset"}.isdisjoint(resumable)


def test_ctrl_c_once_finishes_the_steps_twice_aborts(monkeypatch):
    # The handler's semantics, in-process: the first SIGINT only sets the flag, the second one
    # raises KeyboardInterrupt (launch.py prints one line and exits 130).
    stop, previous = loop.install_stop_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop["signal"] == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# A checkpoint that cannot be written says so, in one line, at the save that failed.
# ---------------------------------------------------------------------------------------------


def test_full_disk_fails_the_save_that_does_not_fit(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    free = os.statvfs(str(directory))

    class Full:
        f_frsize, f_bavail = free.f_frsize, 1  # one block left

    monkeypatch.setattr(checkpointing.os, "statvfs", lambda path: Full)
    with pytest.raises(checkpointing.CheckpointSaveError) as raised:
        ckpt.save(8, {"w": np.zeros(3, np.float32)})
    assert str(raised.value) == (
        f"cannot write the checkpoint of step 8 to {directory}: No space left on device. The "
        "checkpoints already there are intact; free space or fix the permissions, then rerun the "
        "same command to resume."
    )
    ckpt.close()
    assert _steps(tmp_path) == [4]
    np.testing.assert_array_equal(_saved_state(tmp_path)["w"], np.ones(3, np.float32))


@contextlib.contextmanager
def _read_only(directory):
    """`directory` made read-only for this process: chmod, or for root a read-only bind mount."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield
        finally:
            os.chmod(directory, 0o755)
        return
    mount = subprocess.run(
        f"mount --bind {directory} {directory} && mount -o remount,ro,bind {directory}",
        shell=True,
        capture_output=True,
    )
    if mount.returncode:
        subprocess.run(["umount", str(directory)], capture_output=True)
        pytest.skip(f"root cannot make a read-only directory here: {mount.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("fs_full", [False, True], ids=["read-only", "disk-full"])
def test_unwritable_checkpoint_directory_fails_the_save_in_one_line(tmp_path, fs_full):
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    ckpt.manager.wait_until_finished()
    if fs_full:  # a real full filesystem: a small tmpfs (root only)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        small = tmp_path / "small"
        small.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]
        ).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            full = checkpointing.Checkpointer(str(small / "checkpoints"), {"queue_size": 0})
            with pytest.raises(checkpointing.CheckpointSaveError) as raised:
                full.save(4, {"w": np.ones(1 << 16, np.float32)})  # 256 KiB into 64 KiB
            assert re.fullmatch(
                rf"cannot write the checkpoint of step 4 to {small}/checkpoints: No space left on "
                r"device\. The checkpoints already there are intact; .*",
                str(raised.value),
            )
            full.close()
        finally:
            subprocess.run(["umount", str(small)], check=True)
        ckpt.close()
        return
    with _read_only(directory):
        with pytest.raises(checkpointing.CheckpointSaveError) as raised:
            ckpt.save(8, {"w": np.zeros(3, np.float32)})
        assert re.fullmatch(
            rf"cannot write the checkpoint of step 8 to {directory}: (Read-only file system|"
            r"Permission denied)\. The checkpoints already there are intact; .*",
            str(raised.value),
        )
        ckpt.close()  # no second error on the way out
    assert _steps(tmp_path) == [4]


@pytest.mark.slow  # ~2 min; in-process: the lock, the Ctrl-C handler, the stop-and-save path
def test_a_second_run_fails_at_once_and_ctrl_c_checkpoints(tmp_path):
    # A long run (8,000 steps) that the test stops: it must not finish on its own first.
    long = dict(
        max_epochs=1000, checkpoint_every_steps=10_000, eval_every_epochs=1000, knn_every_epochs=0
    )
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    log1 = tmp_path / "first.log"
    with _launched(_launch_args(workdir, **long), log1) as first:
        _wait_until(lambda: metrics.exists() and metrics.stat().st_size, first, log1, "metrics")
        config_before = (workdir / "config.json").read_bytes()

        # The same command with another seed, while the first one trains: refused at once.
        second = run_python(_launch_args(workdir, seed=99, **long), check=False, timeout=1800)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert re.fullmatch(
            rf"error: {workdir} is in use by another run: host {re.escape(socket.gethostname())}"
            rf", PID {first.pid}, since .*",
            second.stderr.strip().splitlines()[-1],
        )
        assert (workdir / "config.json").read_bytes() == config_before  # untouched

        # Ctrl-C: the current steps finish, a checkpoint is written, one line says so.
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=1800) == 130
    output = log1.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert len([line for line in output.splitlines() if "Ctrl-C" in line]) == 1, output[-3000:]
    [reached] = _steps(workdir)
    assert int(_saved_state(workdir)["step"]) == reached
    assert not (workdir / "lock.0").exists()  # released on the way out

    # Ctrl-C twice: the second press aborts at once, in one line (if the first press's
    # checkpoint did not end the run already).
    log2 = tmp_path / "second.log"
    with _launched(_launch_args(workdir, **long), log2) as again:
        _wait_until(
            lambda: max(r["step"] for r in writers.read_metrics(str(workdir))) > reached,
            again,
            log2,
            "progress after the resume",
        )
        again.send_signal(signal.SIGINT)
        _wait_until(lambda: "press Ctrl-C again" in log2.read_text(), again, log2, "the 1st press")
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=1800) == 130
    output = log2.read_text()
    assert f"resumed at step {reached}" in output and "Traceback" not in output, output[-3000:]
    assert (
        "error: aborted by a second Ctrl-C; a rerun resumes from the last checkpoint" in output
        or len(_steps(workdir)) == 2  # the first press's checkpoint ended the run
    )

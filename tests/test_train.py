"""The train step and the trainer: every framework trains, the parts do what the paper says."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DEADLINE_S,
    FRAMEWORKS,
    REFERENCE_STEPS,
    assert_trees_equal,
    checkpoint_steps,
    first_batch_setup,
    forbid_data_loading,
    framework_config,
    launched,
    metric_records,
    reference_config,
    reference_launch_args,
    run_python,
    saved_state,
    wait_until,
)
from test_progress import TRAIN_LINE

from simco_jax import checkpointing, data, loop, methods, train, train_step, writers


def _tiny(framework="simco", **overrides):
    return framework_config(framework, "smoke", **overrides)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_smoke_run_through_launch_leaves_checkpoint_and_metrics(framework, tmp_path):
    workdir = tmp_path / framework
    result = run_python(
        ["launch.py", f"--config=configs/{framework}_cifar.py:smoke", f"--workdir={workdir}"]
    )
    records = writers.read_metrics(str(workdir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    # One convention: accuracies in percent; τ only for the frameworks with a momentum encoder.
    logged = [r for r in records if "loss" in r]
    assert all(0.0 <= r["probe_train_top1"] <= 100.0 and "probe_acc" not in r for r in logged)
    assert all(("tau" in r) == (framework != "simco") for r in logged)
    # Not a terminal: plain progress lines, at least at each epoch end, with the logged loss.
    lines = [m.groupdict() for m in map(TRAIN_LINE.search, result.stderr.splitlines()) if m]
    at_epoch_ends = {line["step"]: line for line in lines if line["step"] in ("8", "16")}
    assert sorted(at_epoch_ends) == ["16", "8"]
    for line in at_epoch_ends.values():
        assert line["total"] == "16" and line["speed"] != "?" and line["eta"] != "?"
        assert float(line["loss"]) == pytest.approx(
            [r["loss"] for r in logged if r["step"] == int(line["step"])][0], abs=1e-4
        )
    assert "eval at epoch 2: {" in result.stderr
    final = [r for r in records if "probe_top1" in r][-1]
    assert 0.0 <= final["probe_top1"] <= final["probe_top5"] <= 100.0
    assert "knn_top1" in final
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps and steps[-1] == 16  # 256 images / batch 32 × 2 epochs
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "synthetic"
    assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_loss_falls_on_a_fixed_batch(framework):
    # No augmentation randomness beyond the crop of the full image: the same two views each step.
    config = _tiny(
        framework,
        min_scale=1.0,
        color_jitter_prob=0.0,
        gray_scale_prob=0.0,
        horizontal_flip_prob=0.0,
        warmup_epochs=0,
        lr=0.5,
        queue_size=0 if framework != "mocov2" else 64,
        base_tau_momentum=0.9,
        final_tau_momentum=0.9,
    )
    _, state, step, images, labels = first_batch_setup(config)
    losses = []
    for _ in range(12):
        state, metrics = step(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


@pytest.mark.parametrize("tau, expect", [(0.0, "online"), (1.0, "unchanged")])
def test_momentum_update_of_params_only(tau, expect):
    config = _tiny("simmoco", base_tau_momentum=tau, final_tau_momentum=tau)
    _, state, step, images, labels = first_batch_setup(config)
    new_state, _ = step(state, images, labels)
    target = new_state.params if expect == "online" else state.method_state["momentum_params"]
    momentum = new_state.method_state["momentum_params"]
    jax.tree.map(np.testing.assert_array_equal, momentum, target)
    # The online parameters did move, so the check above is not vacuous.
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
    assert any(jax.tree.leaves(moved))
    # The key encoder's BatchNorm statistics come from its own forward passes, not from the EMA.
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        new_state.method_state["momentum_batch_stats"],
        state.method_state["momentum_batch_stats"],
    )
    assert all(jax.tree.leaves(changed))


def test_queue_holds_the_last_k_keys_in_order():
    size, batch = 8, 2
    queue = jnp.zeros((size, 3))
    ptr = jnp.zeros((), jnp.int32)
    pushed = []
    for i in range(size // batch + 2):
        keys = jnp.full((batch, 3), float(i)) + jnp.arange(batch)[:, None] / 10
        pushed.append(keys)
        queue, ptr = methods.enqueue(queue, ptr, keys)
    last = np.concatenate(pushed)[-size:]
    # Read the ring from the oldest slot: exactly the last K keys, oldest first.
    np.testing.assert_array_equal(np.roll(np.asarray(queue), -int(ptr), axis=0), last)
    assert int(ptr) == (len(pushed) * batch) % size


def test_train_step_enqueues_this_steps_keys():
    config = _tiny("mocov2", queue_size=64)
    _, state, step, images, labels = first_batch_setup(config)
    steps = 64 // config.batch_size + 2
    history = [np.asarray(state.method_state["queue"])]
    for _ in range(steps):
        state, _ = step(state, images, labels)
        history.append(np.asarray(state.method_state["queue"]))
    b = config.batch_size
    assert int(state.method_state["queue_ptr"]) == (steps * b) % 64
    # Each step rewrote exactly one slot of B rows with unit-norm keys and left the rest alone.
    for i in range(1, steps + 1):
        slot = slice(((i - 1) * b) % 64, ((i - 1) * b) % 64 + b)
        rest = np.ones(64, bool)
        rest[slot] = False
        np.testing.assert_array_equal(history[i][rest], history[i - 1][rest])
        assert not np.array_equal(history[i][slot], history[i - 1][slot])
        np.testing.assert_allclose(np.linalg.norm(history[i][slot], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(momentum_encoder=True, queue_size=0, dt_m=10.0, symmetric=True),  # symmetric SimMoCo
        dict(momentum_encoder=True, queue_size=64, dt_m=10.0, symmetric=False),  # MoCo v2 + DT
        dict(momentum_encoder=True, queue_size=64, dt_m=1.0, symmetric=True),  # MoCo v2+
        dict(momentum_encoder=False, queue_size=64, dt_m=10.0, symmetric=True),  # SimCo + queue
        dict(momentum_encoder=False, queue_size=0, dt_m=1.0, symmetric=False),  # one-way InfoNCE
    ],
)
def test_every_mix_of_the_switches_trains(overrides):
    config = _tiny("simco", **overrides)
    _, state, step, images, labels = first_batch_setup(config)
    for _ in range(2):
        state, metrics = step(state, images, labels)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2


def _run(config, workdir):
    summary = train.train_and_evaluate(config, str(workdir))
    return summary.pop("state"), summary


def test_resume_equals_uninterrupted(tmp_path):
    config = _tiny("simmoco", queue_size=64, max_epochs=2)
    full_state, _ = _run(config, tmp_path / "full")
    first = _tiny("simmoco", queue_size=64, max_epochs=2, max_steps=5)
    stopped, _ = _run(first, tmp_path / "resumed")
    assert int(stopped.step) == 5
    resumed_state, _ = _run(config, tmp_path / "resumed")
    assert int(resumed_state.step) == int(full_state.step) == 16
    jax.tree.map(np.testing.assert_array_equal, resumed_state, full_state)
    full = [r for r in writers.read_metrics(str(tmp_path / "full")) if "probe_top1" in r][-1]
    again = [r for r in writers.read_metrics(str(tmp_path / "resumed")) if "probe_top1" in r][-1]
    assert full["probe_top1"] == again["probe_top1"] and full["knn_top1"] == again["knn_top1"]


def test_npz_dataset_trains(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 5, 96).astype(np.int64),
        test_images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 5, 40).astype(np.int64),
    )
    config = _tiny("simco", dataset="npz", data_path=str(path), max_epochs=1)
    state, summary = _run(config, tmp_path / "run")
    assert int(state.step) == 96 // 32
    assert state.probe_params["linear"]["kernel"].shape[-1] == 5
    assert 0 <= summary["probe_top1"] <= 100


def test_tfds_dataset_trains_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data leaves builders "unprepared" and makes the download a no-op; let it through.
    monkeypatch.setattr(data, "any_host_reachable", lambda *args, **kwargs: True)
    config = _tiny("simco", dataset="cifar10", max_epochs=1, crop_size=32)
    with tfds.testing.mock_data(num_examples=64):
        state, summary = _run(config, tmp_path / "run")
    assert int(state.step) == 64 // 32
    assert state.probe_params["linear"]["kernel"].shape[-1] == 10


def test_incompatible_checkpoint_is_refused(tmp_path):
    _run(_tiny("simmoco", max_steps=2), tmp_path / "run")
    with pytest.raises(checkpointing.CheckpointError, match="queue_size"):
        _run(_tiny("simmoco", queue_size=64, max_steps=4), tmp_path / "run")


def test_sigterm_then_sigkill_then_resume_equals_the_uninterrupted_run(
    reference_run, tmp_path, caplog
):
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"

    # 1. Preemption: SIGTERM once training runs. No periodic checkpoints in this leg, so the
    #    checkpoint that exists afterwards is the one written on the way out.
    log1 = tmp_path / "leg1.log"
    with launched(reference_launch_args(workdir, checkpoint_every_steps=1000), log1) as process:
        wait_until(
            lambda: metrics.exists() and metrics.stat().st_size, [(process, log1)], "metrics"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 143
    output = log1.read_text()
    assert "fresh start" in output
    reached = int(re.search(r"preempted: saved the checkpoint of step (\d+)/32", output)[1])
    assert 4 <= reached < REFERENCE_STEPS and checkpoint_steps(workdir) == [reached]
    assert int(saved_state(workdir)["step"]) == reached

    # 2. Resume it, then SIGKILL right after its first mid-epoch checkpoint (step 4 of the 8 of
    #    an epoch), while it trains on: no chance to clean up.
    log2 = tmp_path / "leg2.log"
    with launched(reference_launch_args(workdir), log2) as process:

        def mid_epoch_checkpoint():
            return any(s > reached and s % 8 == 4 for s in checkpoint_steps(workdir))

        wait_until(mid_epoch_checkpoint, [(process, log2)], "a mid-epoch checkpoint")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    assert f"resumed at step {reached}" in log2.read_text()
    last = checkpoint_steps(workdir)[-1]
    assert last % 8 == 4 and last < REFERENCE_STEPS, f"killed after step {last}, not mid-epoch"
    leftovers = [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]

    # 3. Resume to the end, here: from the last complete checkpoint, to the reference's bits.
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(reference_config(), str(workdir))
    assert f"resumed at step {last}" in caplog.text
    assert summary["step"] == REFERENCE_STEPS
    assert_trees_equal(summary["state"], reference_run[1])
    assert_trees_equal(saved_state(workdir), saved_state(reference_run[0]))
    # The metrics logged after the resume are the reference's, bit for bit.
    tail = [r for r in metric_records(reference_run[0]) if r["step"] > last]
    assert metric_records(workdir)[-len(tail) :] == tail
    # A save cut short by the kill (if any) was cleaned up, not restored.
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()], leftovers
    # The killed leg's lock was stale (its PID is gone) and was taken over.
    assert "took over the stale workdir lock" in caplog.text
    # Steps the killed leg logged past its checkpoint were re-run: one record each in the file.
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in raw if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == REFERENCE_STEPS
    # One config per start, named by the step it started from.
    assert sorted(os.listdir(workdir / "configs")) == sorted(
        {"0.json", f"{reached}.json", f"{last}.json"}
    )


def _diverge_from(monkeypatch, metric, first_bad_step):
    """Makes the step report `metric` as NaN from `first_bad_step` on: a divergence on demand
    (the lr that would force one is now outside its domain)."""

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
        train.train_and_evaluate(reference_config(max_epochs=2), str(workdir))
    message = str(raised.value)
    match = re.fullmatch(
        rf"{metric} became non-finite by step (\d+); stopping without checkpointing "
        rf"\({last_good}\)\. Lower lr, classifier_lr or temperature, or use dtype=float32\.",
        message,
    )
    assert match, message
    assert "None" not in message
    steps = checkpoint_steps(workdir)
    assert steps == ([4, 8] if metric == "loss" else [])  # nothing saved at or after the NaN
    if steps:
        saved = saved_state(workdir)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved) if x.dtype.kind == "f")
        assert int(saved["step"]) == 8 < int(match[1])
    logged = [r[metric] for r in writers.read_metrics(str(workdir)) if metric in r]
    assert np.all(np.isfinite(logged))  # the diverged chunk was never logged


def test_state_check_before_saving_finds_any_non_finite_float_leaf():
    # The loss of step k is computed before update k: an update that overflows the parameters
    # shows in no loss yet, so `save` checks the whole state too, with this function.
    state = {"w": np.ones((3, 2), np.float32), "step": np.int32(7), "rng": jax.random.key(0)}
    assert bool(loop.all_finite(state))
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = {**state, "w": state["w"].copy()}
        poisoned["w"][1, 0] = bad
        assert not bool(loop.all_finite(poisoned))


def test_same_config_and_seed_give_the_same_bits(reference_run, tmp_path):
    summary = train.train_and_evaluate(reference_config(), str(tmp_path / "again"))
    assert_trees_equal(summary["state"], reference_run[1])
    again = metric_records(tmp_path / "again")
    assert again == metric_records(reference_run[0])
    assert any("knn_top1" in r for r in again) and any("loss" in r for r in again)
    for step in (4, 16, 32):  # intermediate checkpoints too, not only the end
        assert_trees_equal(
            saved_state(tmp_path / "again", step), saved_state(reference_run[0], step)
        )


def test_rerun_of_a_finished_run_says_so_at_once_with_its_final_metrics(
    reference_run, tmp_path, monkeypatch, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    forbid_data_loading(monkeypatch)  # nothing is loaded, let alone compiled
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(reference_config(), str(workdir))
    final = writers.read_metrics(str(reference_run[0]))[-1]
    assert summary["complete"] and summary["step"] == REFERENCE_STEPS
    assert summary["probe_top1"] == final["probe_top1"] and summary["knn_top1"] == final["knn_top1"]
    assert re.search(
        rf"{workdir} is complete \(step 32 of 32\); nothing to do. Final metrics: .*"
        rf"probe_top1 {final['probe_top1']:.4g}",
        caplog.text,
    )
    # Accepted changes (periods, keep_checkpoints) do not make a finished run resumable either.
    summary = train.train_and_evaluate(reference_config(log_every_steps=2), str(workdir))
    assert summary["complete"]


def test_resume_accepts_and_logs_a_longer_max_steps(reference_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    for step in (20, 24, 28, 32):  # killed after step 16's checkpoint, having logged up to 32
        shutil.rmtree(workdir / "checkpoints" / str(step))
    first_config = (workdir / "config.json").read_text()
    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(
        reference_config(max_steps=24, keep_checkpoints=50), str(workdir)
    )
    assert "resuming with changed keep_checkpoints 100 -> 50, max_steps -1 -> 24" in caplog.text
    assert summary["step"] == 24
    # One record per step in the file itself: past the restored step it was truncated, and
    # the re-run steps logged the reference's values again.
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in raw if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 24
    reference_records = {r["step"]: r for r in metric_records(reference_run[0])}
    for record in metric_records(workdir):
        if 16 < record["step"] < 24:  # step 24's evaluation comes with the new max_steps
            assert record == reference_records[record["step"]]
    # The config history: the first start's, and this start's.
    assert json.loads((workdir / "configs" / "16.json").read_text())["max_steps"] == 24
    assert json.loads((workdir / "config.json").read_text())["max_steps"] == 24
    assert json.loads((workdir / "configs" / "0.json").read_text()) == json.loads(first_config)


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


@pytest.mark.slow  # ~2 min; in-process: the lock, the Ctrl-C handler, the stop-and-save path
def test_a_second_run_fails_at_once_and_ctrl_c_checkpoints(tmp_path):
    # A long run (8,000 steps) that the test stops: it must not finish on its own first.
    long = dict(
        max_epochs=1000, checkpoint_every_steps=10_000, eval_every_epochs=1000, knn_every_epochs=0
    )
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    log1 = tmp_path / "first.log"
    with launched(reference_launch_args(workdir, **long), log1) as first:
        wait_until(lambda: metrics.exists() and metrics.stat().st_size, [(first, log1)], "metrics")
        config_before = (workdir / "config.json").read_bytes()

        # The same command with another seed, while the first one trains: refused at once.
        second = run_python(
            reference_launch_args(workdir, seed=99, **long), check=False, timeout=1800
        )
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
    [reached] = checkpoint_steps(workdir)
    assert int(saved_state(workdir)["step"]) == reached
    assert not (workdir / "lock.0").exists()  # released on the way out

    # Ctrl-C twice: the second press aborts at once, in one line (if the first press's
    # checkpoint did not end the run already).
    log2 = tmp_path / "second.log"
    with launched(reference_launch_args(workdir, **long), log2) as again:
        wait_until(
            lambda: max(r["step"] for r in writers.read_metrics(str(workdir))) > reached,
            [(again, log2)],
            "progress after the resume",
        )
        again.send_signal(signal.SIGINT)
        wait_until(
            lambda: "press Ctrl-C again" in log2.read_text(), [(again, log2)], "the 1st press"
        )
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=1800) == 130
    output = log2.read_text()
    assert f"resumed at step {reached}" in output and "Traceback" not in output, output[-3000:]
    assert (
        "error: aborted by a second Ctrl-C; a rerun resumes from the last checkpoint" in output
        or len(checkpoint_steps(workdir)) == 2  # the first press's checkpoint ended the run
    )

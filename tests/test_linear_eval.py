"""Offline evaluation of a checkpoint (linear protocol, kNN) and the export CLI, on a smoke run."""

import importlib
import json
import os
import re
import shutil
import signal

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import framework_config, run_python

from simco_jax import checkpointing, export, linear_eval, train, writers
from simco_jax import config as config_lib
from simco_jax import workdir as workdir_lib

NUM_CLASSES = 10  # the smoke variant's synthetic data set


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One smoke SimCo run, 8 steps (one epoch: the run ends on an evaluation with the kNN)."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    summary = train.train_and_evaluate(framework_config("simco", max_steps=8), workdir)
    return workdir, summary


@pytest.fixture(scope="module")
def evaluated(pretrained, tmp_path_factory):
    """`launch.py --config=configs/linear_eval.py:smoke --config.pretrained=...` (both modes)."""
    workdir, _ = pretrained
    out = str(tmp_path_factory.mktemp("linear_out"))
    result = run_python(
        [
            "launch.py",
            "--config=configs/linear_eval.py:smoke",
            f"--config.pretrained={workdir}",
            f"--workdir={out}",
        ]
    )
    return workdir, out, result.stderr


def test_restore_run_returns_the_trained_state(pretrained):
    workdir, summary = pretrained
    run = checkpointing.restore_run(workdir)
    assert run.step == 8 and run.num_classes == NUM_CLASSES
    assert run.config.backbone_width == 4 and run.config.mean == (0.4914, 0.4822, 0.4465)
    trained = summary["state"]
    for got, want in zip(
        jax.tree.leaves((run.state.params, run.state.batch_stats, run.state.probe_params)),
        jax.tree.leaves((trained.params, trained.batch_stats, trained.probe_params)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_results_written_beside_checkpoint_and_in_workdir(evaluated):
    pretrained_dir, out, _ = evaluated
    for name in ("linear_eval.json", "knn_eval.json"):
        with open(os.path.join(pretrained_dir, name)) as f:
            beside = json.load(f)
        with open(os.path.join(out, name)) as f:
            assert json.load(f) == beside
        assert beside["pretrained_step"] == 8 and beside["dataset"] == "synthetic"
        assert 0.0 <= beside["top1"] <= beside["top5"] <= 100.0
    linear = json.load(open(os.path.join(out, "linear_eval.json")))
    assert linear["steps"] == 4 and linear["batch_size"] == 32 and linear["schedule"] == "cosine"
    assert np.isfinite(linear["final_loss"])
    # Test-set accuracies are counts over the 64 test images.
    assert (linear["top1"] * 64 / 100) == pytest.approx(round(linear["top1"] * 64 / 100))
    logged = writers.read_metrics(out)
    assert [r["step"] for r in logged if "linear_loss" in r] == [4]
    assert logged[-1]["probe_top1"] == linear["top1"]
    assert (
        linear["final_train_top1"]
        == [r for r in logged if "linear_loss" in r][0]["linear_train_top1"]
    )


def test_linear_eval_prints_progress_with_an_eta(evaluated):
    _, out, stderr = evaluated
    # Not a terminal: a plain line at the last step. No step is left and no evaluation has
    # measured its rate yet, so the ETA is unknown; the evaluations' own lines follow.
    line = re.search(
        r"linear eval 4/4 epoch 0.50/1 \| ([\d.]+) img/s \| ETA (\?) "
        r"\| loss ([\d.]+) train_top1 ([\d.]+)$",
        stderr,
        re.MULTILINE,
    )
    assert line, stderr
    logged = [r for r in writers.read_metrics(out) if "linear_loss" in r][0]
    assert float(line[1]) > 0
    assert float(line[3]) == pytest.approx(logged["linear_loss"], abs=1e-4)
    assert float(line[4]) == pytest.approx(logged["linear_train_top1"], abs=0.01)


def test_offline_knn_equals_the_runs_final_knn_and_beats_chance(evaluated):
    pretrained_dir, _, _ = evaluated
    knn = json.load(open(os.path.join(pretrained_dir, "knn_eval.json")))
    online = [r for r in writers.read_metrics(pretrained_dir) if "knn_top1" in r][-1]
    # Same checkpoint, k, temperature and clean images: the restored state's kNN is the run's.
    assert online["step"] == 8 and knn["k"] == 10
    assert knn["top1"] == online["knn_top1"] and knn["top5"] == online["knn_top5"]
    assert knn["top1"] > 2 * 100 / NUM_CLASSES  # the synthetic classes are learnable


def test_linear_schedules():
    config = linear_eval.default_config()
    config.linear_schedule = "step"
    step = linear_eval.linear_schedule(config, 100)
    assert [float(step(s)) for s in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    config.linear_schedule = "cosine"
    cosine = linear_eval.linear_schedule(config, 100)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pretrained": ""}, "config.pretrained"),
        ({"mode": "svm"}, "mode must be one of"),
        ({"linear_schedule": "linear"}, "linear_schedule"),
        ({"linear_epochs": 0}, r"linear_epochs must be an integer in \[1, 100000\], got 0"),
        ({"linear_epochs": 1.5}, "linear_epochs must be an integer"),
        ({"linear_lr": 1e39}, "linear_lr must be a finite number in"),
        ({"linear_min_scale": 0.0}, r"linear_min_scale must be a finite number in \(0, 1\]"),
        ({"eval_dataset": 3}, "eval_dataset must be None"),
        ({"knn_k": 0}, "knn_k must be an integer >= 1"),
    ],
)
def test_validate_rejects_bad_settings(overrides, message):
    config = linear_eval.default_config()
    config.pretrained = "runs/x"
    config = ml_collections.ConfigDict({**config.to_dict(), **overrides})  # any type
    with pytest.raises(config_lib.ConfigError, match=message) as raised:
        linear_eval.validate(config)
    assert "\n" not in str(raised.value)


def test_validate_rejects_unknown_keys():
    config = linear_eval.default_config()
    config.pretrained = "runs/x"
    config.batch_size = 64  # a training key: not a linear-eval setting
    message = r"^unknown linear_eval key batch_size \(did you mean eval_batch_size\?\); the keys"
    with pytest.raises(config_lib.ConfigError, match=message):
        linear_eval.validate(config)


def test_restore_run_without_a_run_says_so(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="has no config.json"):
        checkpointing.restore_run(str(tmp_path))


def test_export_cli_writes_torchvision_names_shapes_and_values(pretrained, tmp_path, capsys):
    workdir, summary = pretrained
    out = tmp_path / "backbone.safetensors"
    export.main([f"--workdir={workdir}", f"--out={out}"])
    # The smoke run's width 4 cannot load into stock torchvision: the command says so, and prints
    # the code that does (run by tests/test_export.py).
    printed = capsys.readouterr().out
    assert printed.startswith(
        f"wrote 120 tensors to {out}: resnet18 backbone, width 4, CIFAR stem."
    )
    assert "resnet18() has width 64 and cannot load it" in printed
    assert "model.layer4 = model._make_layer(BasicBlock, 32, 2, stride=2)" in printed
    assert printed.rstrip().endswith(f'state = load_file("{out}")\nmodel.load_state_dict(state)')
    tensors = export.load_safetensors(out)
    expected = export.torchvision_state_dict_shapes("resnet18", width=4, cifar_stem=True)
    assert list(tensors) == list(expected)
    assert {name: tuple(v.shape) for name, v in tensors.items()} == expected
    params = summary["state"].params["backbone"]
    stats = summary["state"].batch_stats["backbone"]
    np.testing.assert_array_equal(
        tensors["conv1.weight"], np.asarray(params["conv1"]["kernel"]).transpose(3, 2, 0, 1)
    )
    np.testing.assert_array_equal(
        tensors["layer4.1.bn2.running_var"], np.asarray(stats["layer4_1"]["bn2"]["var"])
    )


def _linear_config(pretrained, **overrides):
    config = importlib.import_module("configs.linear_eval").get_config("smoke")
    config.update(pretrained=str(pretrained), **overrides)
    return config


def _saved_classifier(workdir):
    """The linear evaluation's last checkpoint, read with plain Orbax (no template)."""
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    try:
        step = manager.latest_step()
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        return step, manager.restore(step, args=args)["state"]
    finally:
        manager.close()


# The subprocess of the kill test: the evaluation, killed (SIGKILL: no cleanup) when it is
# about to save the checkpoint of step 12, with the checkpoint of step 6 complete.
_KILLED_AT_12 = """
import importlib, os, signal, sys
from simco_jax import checkpointing, linear_eval
save = checkpointing.Checkpointer.save
def save_or_die(self, step, state, **kwargs):
    if step == 12:
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, step, state, **kwargs)
checkpointing.Checkpointer.save = save_or_die
config = importlib.import_module("configs.linear_eval").get_config("smoke")
config.update(pretrained=sys.argv[1], **{KEYS})
linear_eval.evaluate_checkpoint(config, sys.argv[2])
"""


# 16 steps of 8 per epoch, logged at 8 and 16, checkpointed at 6, 12 and 16.
INTERRUPTED = dict(mode="linear", linear_epochs=2, linear_max_steps=-1, checkpoint_every_steps=6)


@pytest.fixture(scope="module")
def uninterrupted(pretrained, tmp_path_factory):
    """The evaluation the interrupted ones must end equal to: its workdir and results."""
    workdir, _ = pretrained
    out = tmp_path_factory.mktemp("uninterrupted")
    results = linear_eval.evaluate_checkpoint(_linear_config(workdir, **INTERRUPTED), str(out))
    return out, results


def _assert_same_as_uninterrupted(uninterrupted, run, results):
    full, full_results = uninterrupted
    drop = ("wall_s",)
    assert {k: v for k, v in results["linear"].items() if k not in drop} == {
        k: v for k, v in full_results["linear"].items() if k not in drop
    }
    (step, state), (full_step, full_state) = _saved_classifier(run), _saved_classifier(full)
    assert step == full_step == 16
    jax.tree.map(np.testing.assert_array_equal, state, full_state)
    timing = ("images_per_s", "eta_s")

    def records(directory):
        lines = (directory / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]

    assert records(run) == records(full)


def test_linear_eval_resumes_after_sigkill_as_if_uninterrupted(pretrained, uninterrupted, tmp_path):
    workdir, _ = pretrained
    run = tmp_path / "run"
    script = _KILLED_AT_12.replace("{KEYS}", repr(INTERRUPTED))
    killed = run_python(["-c", script, workdir, str(run)], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["6"]
    assert [r["step"] for r in writers.read_metrics(str(run))] == [8]  # logged past step 6
    assert (run / "lock.0").exists()  # left by the kill; its PID is gone

    resumed = linear_eval.evaluate_checkpoint(_linear_config(workdir, **INTERRUPTED), str(run))
    _assert_same_as_uninterrupted(uninterrupted, run, resumed)
    assert sorted(os.listdir(run / "configs")) == ["0.json", "6.json"]


def test_linear_eval_checkpoints_on_sigterm_and_resumes(
    pretrained, uninterrupted, tmp_path, monkeypatch
):
    workdir, _ = pretrained
    run = tmp_path / "run"
    save = checkpointing.Checkpointer.save

    def save_then_preempt(self, step, state, **kwargs):
        save(self, step, state, **kwargs)
        if step == 6:  # between two log points
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_preempt)
    stopped = linear_eval.evaluate_checkpoint(_linear_config(workdir, **INTERRUPTED), str(run))
    assert stopped == {"preempted": signal.SIGTERM}
    assert sorted(os.listdir(run / "checkpoints")) == ["6"]
    assert not (run / "linear_eval.json").exists() and not (run / "lock.0").exists()
    monkeypatch.undo()
    resumed = linear_eval.evaluate_checkpoint(_linear_config(workdir, **INTERRUPTED), str(run))
    _assert_same_as_uninterrupted(uninterrupted, run, resumed)


def test_linear_eval_refuses_a_workdir_in_use_and_touches_nothing(pretrained, tmp_path):
    workdir, _ = pretrained
    out = tmp_path / "eval"
    held = workdir_lib.WorkdirLock(str(out.mkdir() or out))  # another evaluation runs there
    try:
        with pytest.raises(workdir_lib.WorkdirLockError, match="is in use by another run"):
            linear_eval.evaluate_checkpoint(_linear_config(workdir), str(out))
        assert os.listdir(out) == ["lock.0"]
    finally:
        held.release()


@pytest.mark.parametrize("where", ["the run", "its parent", "its checkpoints"])
def test_linear_eval_never_writes_into_the_pretrained_runs_root(pretrained, where):
    workdir, _ = pretrained
    out = {
        "the run": workdir,
        "its parent": os.path.dirname(workdir),
        "its checkpoints": os.path.join(workdir, "checkpoints", "x"),
    }[where]
    before = {p: open(p, "rb").read() for p in _files(workdir)}
    with pytest.raises(config_lib.ConfigError) as raised:
        linear_eval.evaluate_checkpoint(_linear_config(workdir), out)
    message = str(raised.value)
    assert "\n" not in message and "the pretrained run's workdir" in message, message
    assert {p: open(p, "rb").read() for p in _files(workdir)} == before
    # Its own subdirectory is where the README puts the evaluation.
    linear_eval.check_workdir(_linear_config(workdir), os.path.join(workdir, "linear"))


def _files(directory):
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
    )


def test_linear_eval_of_an_unfinished_run_says_so_in_one_line_and_writes_nothing(
    pretrained, tmp_path
):
    workdir, _ = pretrained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(workdir, unfinished, ignore=shutil.ignore_patterns("lock.*"))
    saved = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**saved, "max_steps": -1}))  # 16 steps
    out = unfinished / "linear"
    result = run_python(
        [
            "launch.py",
            "--config=configs/linear_eval.py:smoke",
            f"--config.pretrained={unfinished}",
            f"--workdir={out}",
        ],
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {unfinished} has not finished training (its latest checkpoint is step 8 of 16): "
        "rerun its training command to finish it, or pass --config.allow_unfinished=true to "
        "evaluate step 8"
    )
    assert not out.exists()
    allowed = _linear_config(unfinished, allow_unfinished=True)
    assert linear_eval.check_finished(allowed) == 8


def test_an_unwritable_pretrained_run_gets_no_results_and_is_told_first(
    pretrained, tmp_path, monkeypatch, caplog
):
    workdir, _ = pretrained
    writable = os.access

    def access(path, mode):  # the run's directory is read-only (as for a read-only mount)
        return os.path.realpath(path) != os.path.realpath(workdir) and writable(path, mode)

    monkeypatch.setattr(linear_eval.os, "access", access)
    out = str(tmp_path / "eval")
    assert linear_eval._results_directories(_linear_config(workdir), out) == [out]
    assert f"{workdir} cannot be written: the results go to {out} only" in caplog.text
    monkeypatch.setattr(linear_eval.os, "access", lambda path, mode: False)
    with pytest.raises(config_lib.ConfigError, match="cannot write to --workdir"):
        linear_eval._results_directories(_linear_config(workdir), out)

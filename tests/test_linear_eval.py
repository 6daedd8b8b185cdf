"""Offline evaluation of a checkpoint (linear protocol, kNN) and the export CLI, on a smoke run."""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from helpers import framework_config, run_python

from simco_jax import config as config_lib
from simco_jax import export, linear_eval, train, writers

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
    run = linear_eval.restore_run(workdir)
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
    # Not a terminal: a plain line at the last step, its ETA covering the evaluations left.
    line = re.search(
        r"linear eval 4/4 epoch 0.50/1 \| ([\d.]+) img/s \| ETA (\d+:\d\d:\d\d) "
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
    with pytest.raises(FileNotFoundError, match="config.json"):
        linear_eval.restore_run(str(tmp_path))


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

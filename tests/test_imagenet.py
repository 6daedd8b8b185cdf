"""The ImageNet configs (MoCo v2's recipe for all three frameworks) and the ImageNet-100 class
list."""

import hashlib
import importlib
import importlib.util
import math
import os
import re

import pytest
from helpers import FRAMEWORKS, REPO

from simco_jax import augment
from simco_jax import config as config_lib

FRAMEWORK_KEYS = {"momentum_encoder", "queue_size", "dt_m", "symmetric", "temperature"}
CLASS_LIST = os.path.join(REPO, "configs", "imagenet100_classes.txt")


def imagenet_config(framework, variant=None, **overrides):
    config = importlib.import_module(f"configs.{framework}_imagenet").get_config(variant)
    config.update(overrides)
    return config


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("variant", [None, "imagenet100", "smoke", "imagenet100,smoke"])
def test_shipped_imagenet_configs_are_valid(framework, variant, tmp_path):
    config = imagenet_config(framework, variant)
    if config.dataset == "imagefolder":
        config.data_path = str(tmp_path)
    config_lib.validate(config, num_devices=8)
    augment.AugmentParams.from_config(config)  # the augmentation accepts it too
    assert config.class_list == (CLASS_LIST if "imagenet100" in (variant or "") else "")
    if variant and "smoke" in variant:  # a generated folder unless data_path names one
        assert config.dataset == "generated_imagefolder" and not config.cifar_stem
        assert config.backbone_width <= 8 and config.crop_size <= 32


def test_imagenet_frameworks_differ_only_in_the_framework_keys():
    configs = {f: imagenet_config(f).to_dict() for f in FRAMEWORKS}
    differing = {k for k in configs["simco"] if len({repr(c[k]) for c in configs.values()}) > 1}
    assert differing == FRAMEWORK_KEYS
    # The framework keys are the CIFAR configs' (τα and dt_m included), except MoCo v2's τ.
    for framework in FRAMEWORKS:
        cifar = importlib.import_module(f"configs.{framework}_cifar").get_config()
        for key in FRAMEWORK_KEYS - {"temperature"}:
            assert configs[framework][key] == cifar[key], (framework, key)
    assert configs["mocov2"]["temperature"] == 0.2
    assert configs["simco"]["temperature"] == configs["simmoco"]["temperature"] == 0.1


def test_imagenet_recipe_is_moco_v2s():
    c = imagenet_config("mocov2")
    assert (c.dataset, c.backbone, c.crop_size) == ("imagenet2012", "resnet50", 224)
    assert c.cifar_stem is False and c.scale_lr is True
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay) == (256, 0.03, 0.9, 1e-4)
    assert (c.max_epochs, c.warmup_epochs, c.min_lr) == (200, 0, 0.0)
    # The kNN monitor stays on at this scale: a bank of ~100 images per class, not all of them.
    assert (c.knn_every_epochs, c.knn_bank_size) == (10, 100_000)
    assert imagenet_config("simco", "imagenet100").knn_bank_size == 10_000
    assert (c.queue_size, c.base_tau_momentum, c.final_tau_momentum) == (65536, 0.999, 0.999)
    assert (c.proj_hidden_dim, c.proj_output_dim) == (2048, 128)
    aug = augment.AugmentParams.from_config(c)
    assert (aug.min_scale, aug.max_scale) == (0.2, 1.0)
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (aug.color_jitter_prob, aug.gray_scale_prob, aug.gaussian_prob) == (0.8, 0.2, 0.5)
    assert (aug.solarization_prob, aug.horizontal_flip_prob) == (0.0, 0.5)
    assert aug.mean == (0.485, 0.456, 0.406) and aug.std == (0.229, 0.224, 0.225)


def test_imagefolder_switch_is_two_overrides(tmp_path):
    config = imagenet_config("simco", None, dataset="imagefolder", data_path=str(tmp_path))
    config_lib.validate(config, num_devices=1)
    # Nothing else changes: the recipe is the same on either source.
    default = imagenet_config("simco").to_dict()
    changed = {k for k, v in config.to_dict().items() if default[k] != v}
    assert changed == {"dataset", "data_path"}


def test_imagenet100_class_list_is_cmcs_100_wordnet_ids():
    with open(CLASS_LIST) as f:
        lines = f.read().splitlines()
    assert len(lines) == 100 and len(set(lines)) == 100
    assert all(re.fullmatch(r"n\d{8}", line) for line in lines)
    # The list of CMC (HobbitLong/CMC imagenet100.txt), in its order; any edit changes this.
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert digest == "b06db93f7ac2851ef476c162d6c4cbba17197be0269c88005add46486f682cb0"
    assert lines[:3] == ["n02869837", "n01749939", "n02488291"] and lines[-1] == "n02090622"


def test_unknown_imagenet_variant_is_named():
    with pytest.raises(ValueError, match="unknown config variant 'cifar10'"):
        imagenet_config("simco", "cifar10")


# --------------------------------------------------------------------------------------------
# Through the streaming input: ImageNet-100 selects its classes, the smoke variants train.


def _tiny_jpeg(path, value):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 90)).save(path, "JPEG")


def test_imagenet100_selects_exactly_the_listed_classes(tmp_path):
    from simco_jax import inputs

    with open(CLASS_LIST) as f:
        listed = [line.strip() for line in f if line.strip()]
    extra = ["n00000001", "n99999999"]  # in the folder, not in the list: left out
    for split in ("train", "val"):
        for i, wnid in enumerate(sorted(listed + extra)):
            _tiny_jpeg(os.path.join(tmp_path, split, wnid, f"{wnid}_0.JPEG"), i % 256)
    config = imagenet_config("simco", "imagenet100,smoke", data_path=str(tmp_path))
    config_lib.validate(config)
    _, train, test, num_classes = inputs.open_splits(config)
    assert num_classes == 100 and len(train) == len(test) == 100
    wnids = [os.path.basename(os.path.dirname(train.paths[i])) for i in range(len(train))]
    assert wnids == sorted(listed)  # labels in sorted class order, as torchvision's
    assert [train.load(i)[1] for i in range(len(train))] == list(range(100))
    assert [os.path.basename(os.path.dirname(p)) for p in test.paths] == sorted(listed)
    # A listed class without a folder is named.
    os.rename(os.path.join(tmp_path, "val", listed[0]), os.path.join(tmp_path, "val_x"))
    with pytest.raises(inputs.data.DataError, match=f"lacks 1 of the 100 classes.*{listed[0]}"):
        inputs.open_splits(config)
    # tfds imagenet2012 takes the list too (tests/test_tfds_streaming.py); here it is unprepared.
    tfds_config = imagenet_config("simco", "imagenet100", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(inputs.data.DataError, match="'imagenet2012' is not prepared in"):
        inputs.create(tfds_config, None)


def test_the_smoke_variant_generates_its_image_folder_once_in_the_cache(tmp_path, monkeypatch):
    from simco_jax import inputs, sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = imagenet_config("simco", "smoke")
    config_lib.validate(config)  # no data_path needed
    name, train, test, num_classes = inputs.open_splits(config)
    assert (name, len(train), len(test), num_classes) == ("generated_imagefolder", 96, 32, 4)
    root = os.path.dirname(os.path.dirname(os.path.dirname(train.paths[0])))
    assert root.startswith(str(tmp_path / "cache" / "simco_jax"))
    written = {p: os.stat(p).st_mtime_ns for p in train.paths}
    again = inputs.open_splits(config)[1]
    assert again.identity == train.identity  # the same bytes, not written again
    assert {p: os.stat(p).st_mtime_ns for p in again.paths} == written
    image, label = train.load(0)  # real JPEGs, read through the image folder's path
    assert image.mode == "RGB" and min(image.size) >= 40 and label == 0
    # ImageNet-100's smoke run generates its 100 classes; data_path still names a real folder.
    hundred = inputs.open_splits(imagenet_config("simco", "imagenet100,smoke"))
    assert hundred.num_classes == 100 and len(hundred.train) == 100
    _tiny_jpeg(os.path.join(tmp_path, "mine", "train", "a", "a.JPEG"), 1)
    _tiny_jpeg(os.path.join(tmp_path, "mine", "val", "a", "a.JPEG"), 2)
    mine = inputs.open_splits(imagenet_config("simco", "smoke", data_path=str(tmp_path / "mine")))
    assert (mine.name, len(mine.train)) == ("mine", 1)
    assert sources.cache_dir() == str(tmp_path / "cache" / "simco_jax")


@pytest.mark.slow
def test_the_imagenet_smoke_command_runs_as_it_is_offline(tmp_path):
    """`python launch.py --config=configs/simco_imagenet.py:smoke --workdir=W`, nothing else."""
    from helpers import run_python

    from simco_jax import writers

    workdir = tmp_path / "run"
    run_python(
        ["launch.py", "--config=configs/simco_imagenet.py:smoke", f"--workdir={workdir}"],
        env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    records = writers.read_metrics(str(workdir))
    assert records[-1]["step"] == 6 and "knn_top1" in records[-1]  # 96 images, batch 32, 2 epochs


@pytest.mark.slow
@pytest.mark.parametrize(
    "framework, devices", [("simco", 1), ("simmoco", 1), ("mocov2", 1), ("simco", 8)]
)
def test_imagenet_smoke_configs_train_through_launch(framework, devices, tmp_path):
    from helpers import run_python
    from test_streaming import make_image_folder

    from simco_jax import writers

    make_image_folder(str(tmp_path / "folder"))
    workdir = tmp_path / "run"
    run_python(
        [
            "launch.py",
            f"--config=configs/{framework}_imagenet.py:smoke",
            f"--workdir={workdir}",
            f"--config.data_path={tmp_path / 'folder'}",
            "--config.max_unreadable_fraction=0.05",  # the folder holds one truncated JPEG
        ],
        env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
    )
    records = writers.read_metrics(str(workdir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(map(math.isfinite, losses))
    assert records[-1]["step"] == 6  # 100 images / batch 32 = 3 steps × 2 epochs, streamed
    assert "probe_top1" in records[-1]

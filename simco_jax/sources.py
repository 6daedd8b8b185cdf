"""The data sources: one table of what each `config.dataset` needs and how it opens.

A source is an entry of `SOURCES` (any name not in it is a tfds dataset, `TFDS`):

* `load(config) -> data.Dataset`: the whole dataset in host memory, for resident input (None: the
  source cannot be resident);
* `open(config, select) -> Splits`: the streamed training and test splits (None: the resident
  arrays, streamed from memory); `select` is the class names of `config.class_list`, or None;
* `data_path`: what `--config.data_path` must name ('' = it needs none);
* `auto_mode(config)`: the input mode 'auto' picks (default: resident when it can load);
* `class_names`: whether its labels have names that `config.class_list` can select;
* `tfds`: a tfds dataset, whose test split `config.eval_dataset` can replace.

Built in: 'synthetic', 'npz', 'imagefolder', 'generated_imagefolder' (an image folder generated
once into the user's cache, or `data_path`'s when set: the ImageNet smoke runs need no data).
Adding a source is one `register(name, Source(...))` with its open or load function. Which
modules ask: `config` (what a source needs, before anything is read), `inputs` (the mode, and the
splits or arrays it opens). This module reads no JAX, so the config checks stay light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from simco_jax import data, streaming

# 'auto' streams a tfds dataset whose decoded training images exceed this (each device holds a
# copy in resident mode), and any whose images differ in size.
RESIDENT_MAX_BYTES = 2 * 2**30


class Splits(NamedTuple):
    name: str  # the dataset's name, for logs and results
    train: streaming.Split
    test: streaming.Split
    num_classes: int


@dataclasses.dataclass(frozen=True)
class Source:
    load: Callable[[Any], data.Dataset] | None = None
    open: Callable[[Any, list | None], Splits] | None = None
    data_path: str = ""
    auto_mode: Callable[[Any], str] | None = None
    class_names: bool = False
    tfds: bool = False

    @property
    def resident(self) -> bool:
        return self.load is not None

    def mode(self, config) -> str:
        if self.auto_mode is not None:
            return self.auto_mode(config)
        return "resident" if self.resident else "streaming"


SOURCES: dict[str, Source] = {}


def register(name: str, source: Source) -> None:
    """Adds (or replaces) the source called `name`."""
    if source.load is None and source.open is None:
        raise ValueError(f"source {name!r} needs a load or an open function")
    SOURCES[name] = source


def get(name: str) -> Source:
    """The source of `config.dataset` = `name`; a name not in the table is a tfds dataset."""
    return SOURCES.get(name, TFDS)


def config_errors(c):
    """What the source of `c.dataset` needs of the config, as messages (see `config.validate`)."""
    source = get(c.dataset)
    if source.data_path and not c.data_path:
        yield f"dataset={c.dataset!r} needs --config.data_path={source.data_path}"
    if not source.resident and c.input_mode == "resident":
        yield f"dataset={c.dataset!r} streams from disk; use input_mode='auto' or 'streaming'"


def load_dataset(config) -> data.Dataset:
    """The whole dataset of `config.dataset` in host memory (resident input)."""
    source = get(config.dataset)
    if source.load is None:
        raise data.DataError(f"dataset={config.dataset!r} streams; it cannot be loaded resident")
    return source.load(config)


def open_splits(config, select: list[str] | None = None) -> Splits:
    """The streamed splits of `config.dataset`; `select`: class names (config.class_list)."""
    source = get(config.dataset)
    if select and not source.class_names:  # refused before any data is read
        raise data.DataError(
            f"config.class_list selects classes of an image folder or a tfds dataset; "
            f"dataset={config.dataset!r} has no class names: set class_list=''."
        )
    if source.open is not None:
        return source.open(config, select)
    dataset = load_dataset(config)  # resident data, streamed on request
    train = streaming.array_split("train", dataset.train_images, dataset.train_labels)
    test = streaming.array_split("test", dataset.test_images, dataset.test_labels)
    return Splits(dataset.name, train, test, dataset.num_classes)


# ----------------------------------------------------------------------------------------------
# The built-in sources.
# ----------------------------------------------------------------------------------------------


def _open_image_folder(config, select) -> Splits:
    root = os.path.expanduser(config.data_path)
    train, classes = streaming.image_folder_split(os.path.join(root, "train"), select=select)
    test, _ = streaming.image_folder_split(os.path.join(root, "val"), classes, select=select)
    return Splits(os.path.basename(os.path.normpath(root)), train, test, len(classes))


def _open_smoke_folder(config, select) -> Splits:
    """`config.data_path`'s image folder, or when it is '' a tiny generated one."""
    if config.data_path:
        return _open_image_folder(config, select)
    generated = config.copy_and_resolve_references()
    generated.data_path = generated_image_folder(tuple(select or SMOKE_CLASSES))
    return _open_image_folder(generated, select)._replace(name="generated_imagefolder")


SMOKE_CLASSES = ("n00000000", "n00000001", "n00000002", "n00000003")
_SMOKE_VERSION = 1  # part of the cache key: bump it when the generated images change


def cache_dir() -> str:
    """The user's cache directory for what this package generates ($XDG_CACHE_HOME, ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "simco_jax")


def generated_image_folder(classes: tuple[str, ...], train: int = 96, val: int = 32) -> str:
    """ROOT/{train,val}/<class>/*.JPEG of about `train` and `val` images over `classes` (at least
    one per class): a colour per class plus noise, 40-64 px JPEGs, the same bytes on every call.
    Written once per class list into the cache (atomically: concurrent processes agree) and
    reused; returns ROOT. Nothing is downloaded."""
    recipe = "\n".join([str(_SMOKE_VERSION), str(train), str(val), *classes])
    key = hashlib.sha256(recipe.encode()).hexdigest()
    root = os.path.join(cache_dir(), "generated_imagefolder", key[:16])
    if os.path.isdir(root):
        return root
    from PIL import Image

    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=".staging-")
    except OSError as error:
        raise data.DataError(
            f"cannot write the generated image folder in {parent!r} ({error.strerror}); set "
            f"XDG_CACHE_HOME to a writable directory or pass --config.data_path=ROOT."
        ) from None
    rng = np.random.default_rng(0)
    for split, total in (("train", train), ("val", val)):
        per_class = max(1, -(-total // len(classes)))
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(staging, split, name))
            base = np.array([(70 * label) % 256, 255 - (40 * label) % 256, 128], np.float64)
            for i in range(per_class):
                height, width = rng.integers(40, 65, size=2)
                pixels = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255)
                path = os.path.join(staging, split, name, f"{name}_{i:04d}.JPEG")
                Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=90)
    try:
        os.rename(staging, root)
    except OSError:  # another process finished first: its folder holds the same bytes
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _open_tfds(config, select) -> Splits:
    """`config.eval_dataset` names another tfds dataset whose `validation` (else `test`) split is
    the test split, its labels mapped by ClassLabel name to the training dataset's."""
    data_dir = config.data_dir or None
    builder = streaming.open_tfds(config.dataset, data_dir)
    splits = builder.info.splits
    eval_name = config.eval_dataset or config.dataset
    eval_builder = streaming.open_tfds(eval_name, data_dir) if config.eval_dataset else builder
    eval_split = next((s for s in ("validation", "test") if s in eval_builder.info.splits), None)
    if "train" not in splits or eval_split is None:
        named = {config.dataset: builder, eval_name: eval_builder}
        has = ", ".join(f"{n!r} has splits {sorted(b.info.splits)}" for n, b in named.items())
        raise data.DataError(
            f"tfds dataset {has}; streaming needs 'train' and 'validation' or 'test' (of "
            f"config.eval_dataset when it is set)."
        )
    train = streaming.tfds_split(config.dataset, "train", data_dir, select=select)
    names = builder.info.features["label"].names if config.eval_dataset else None
    test = streaming.tfds_split(eval_name, eval_split, data_dir, select=select, label_names=names)
    if not len(test):
        raise data.DataError(
            f"{test.name} has no records of the classes of config.class_list="
            f"{config.class_list!r}: there is nothing to evaluate."
        )
    num_classes = len(select) if select else builder.info.features["label"].num_classes
    return Splits(config.dataset, train, test, num_classes)


def _tfds_mode(config) -> str:
    """Streaming when a tfds dataset's images vary in size or exceed RESIDENT_MAX_BYTES decoded."""
    try:
        import tensorflow_datasets as tfds

        info = tfds.builder(config.dataset, data_dir=config.data_dir or None).info
        shape = info.features["image"].shape
        if None in shape:
            return "streaming"
        examples = info.splits["train"].num_examples if "train" in info.splits else 0
        large = examples * math.prod(shape) > RESIDENT_MAX_BYTES
        return "streaming" if large else "resident"
    except Exception:  # noqa: BLE001 - unknown or unprepared: data.load_tfds says what is wrong
        return "resident"


TFDS = Source(
    load=data.load_tfds, open=_open_tfds, auto_mode=_tfds_mode, class_names=True, tfds=True
)
register("synthetic", Source(load=data.synthetic_dataset))
register("npz", Source(load=data.load_npz, data_path="/path/to/arrays.npz"))
register(
    "generated_imagefolder",  # the ImageNet configs' smoke variant: runs with no data
    Source(open=_open_smoke_folder, class_names=True),
)
register(
    "imagefolder",
    Source(
        open=_open_image_folder,
        data_path="ROOT (ROOT/train/<class>/*.JPEG)",
        class_names=True,
    ),
)

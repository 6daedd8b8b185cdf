"""Tiny tfds image-classification datasets, prepared at test time without any download.

    python tests/tiny_tfds.py build DATA_DIR          # prepares every dataset of DATASETS
    python tests/tiny_tfds.py offline SCRIPT ARGS...  # runs SCRIPT with the network forbidden

`build` runs in a fresh interpreter, so the builder classes are never registered in the process
that reads the data: it must find the datasets from their files in DATA_DIR (tfds's read-only
builder, from dataset_info.json), as it finds a user's prepared imagenet2012. The images and
labels are a pure function of (dataset, split), so a test recomputes them with `examples`
without importing tfds.
"""

import os
import runpy
import socket
import sys

import numpy as np

# ClassLabel names, WordNet-ID-like and deliberately not in sorted order: a class list's labels
# follow the sorted names, not the dataset's label ids.
WNIDS = ("n02085620", "n01440764", "n04592741", "n01443537", "n03000134", "n02102040")
# ImageNet-100's classes (configs/imagenet100_classes.txt, in its order) and three others, as in
# imagenet2012 (whose ClassLabel names are WordNet IDs).
with open(os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet100_classes.txt")) as f:
    IMAGENET100 = tuple(line.strip() for line in f if line.strip())
IN100_NAMES = ("n00000001", *IMAGENET100[:50], "n09999998", *IMAGENET100[50:], "n09999999")
# An evaluation set in the style of imagenet_v2 for tiny_wnids: some of its class names, in
# another order (imagenet_v2 names all of imagenet2012's classes, in the same order).
V2_NAMES = ("n02102040", "n01440764", "n04592741", "n02085620")
DATASET_VERSION = "1.0.0"
# name -> (file format, {split: (seed, number of examples)}, image side (None: 20-60 px),
# ClassLabel names; None: an integer label that is no ClassLabel, with six values).
DATASETS = {
    "tiny_wnids": ("array_record", {"train": (0, 48), "validation": (1, 18)}, None, WNIDS),
    "tiny_wnids_test_only": ("array_record", {"train": (2, 30), "test": (3, 12)}, None, WNIDS),
    "tiny_wnids_tfrecord": ("tfrecord", {"train": (0, 48), "validation": (1, 18)}, None, WNIDS),
    # One image size and small: resident under input_mode='auto', read from ArrayRecord files.
    "tiny_fixed": ("array_record", {"train": (4, 40), "test": (5, 10)}, 16, WNIDS),
    # One image per class and split.
    "tiny_imagenet100": (
        "array_record",
        {"train": (6, 103), "validation": (7, 103)},
        None,
        IN100_NAMES,
    ),
    # Only a test split, as imagenet_v2, imagenet_a and imagenet_r.
    "tiny_wnids_v2": ("array_record", {"test": (8, 14)}, None, V2_NAMES),
    "tiny_int_labels": ("array_record", {"test": (9, 6)}, None, None),
}


def examples(name: str, split: str) -> list[tuple[np.ndarray, int]]:
    """The (uint8 RGB image, label) pairs of a split, every class present."""
    _, splits, side, names = DATASETS[name]
    seed, count = splits[split]
    rng = np.random.default_rng([seed, 7])
    labels = rng.permutation(np.arange(count) % (6 if names is None else len(names)))
    out = []
    for label in labels:
        height, width = rng.integers(20, 61, size=2) if side is None else (side, side)
        out.append((rng.integers(0, 256, (height, width, 3), dtype=np.uint8), int(label)))
    return out


def forbid_network(patch=setattr) -> None:
    """Any attempt to reach another machine raises; local Unix sockets stay allowed.
    `patch(obj, name, value)`: setattr, or pytest's monkeypatch.setattr to undo it after a test."""

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access in an offline test: {args} {kwargs}")

    original_connect = socket.socket.connect

    def connect(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):
            return original_connect(self, address)
        return refuse(address)

    patch(socket.socket, "connect", connect)
    patch(socket.socket, "connect_ex", connect)
    patch(socket, "create_connection", refuse)
    patch(socket, "getaddrinfo", refuse)


def build(data_dir: str) -> None:
    import tensorflow_datasets as tfds

    def builder_class(dataset_name):
        _, splits, side, names = DATASETS[dataset_name]
        shape = (None, None, 3) if side is None else (side, side, 3)

        class Builder(tfds.core.GeneratorBasedBuilder):
            name = dataset_name
            VERSION = tfds.core.Version(DATASET_VERSION)

            def _info(self):
                features = tfds.features.FeaturesDict(
                    {
                        # PNG: lossless, so a decoded image equals the generated array.
                        "image": tfds.features.Image(shape=shape, encoding_format="png"),
                        "label": tfds.features.Tensor(shape=(), dtype=np.int64)
                        if names is None
                        else tfds.features.ClassLabel(names=list(names)),
                    }
                )
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                del dl_manager  # nothing is downloaded
                return {split: self._generate_examples(split) for split in splits}

            def _generate_examples(self, split):
                for i, (image, label) in enumerate(examples(dataset_name, split)):
                    yield f"{split}-{i}", {"image": image, "label": label}

        return Builder

    for dataset_name, (file_format, *_) in DATASETS.items():
        builder_class(dataset_name)  # registered under its name by tfds
        # The call the README gives for imagenet2012 (which adds its manual_dir).
        builder = tfds.builder(dataset_name, data_dir=data_dir, file_format=file_format)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )


if __name__ == "__main__":
    forbid_network()
    command, *rest = sys.argv[1:]
    if command == "build":
        build(rest[0])
    elif command == "offline":
        script = os.path.abspath(rest[0])
        sys.argv = rest
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
    else:
        raise SystemExit(f"unknown command {command!r}; known: build, offline")

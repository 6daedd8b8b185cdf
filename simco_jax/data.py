"""Whole datasets in host memory as NumPy arrays: tfds, an .npz file, or synthetic.

The trainer puts the training images on the device as uint8 and shuffles, batches and augments
there, so this module only has to deliver four arrays and a class count, and to reject anything
the trainer cannot use with a message that says how to fix it.

``config.dataset`` picks the source (the table of sources is `sources`):

* ``'synthetic'``: generated from ``config.seed``; learnable (each class is a fixed colour and
  coarse pattern plus noise), for smoke runs and tests. Downloads nothing.
* ``'npz'``: ``config.data_path`` holds ``train_images``, ``train_labels``, ``test_images`` and
  ``test_labels`` (extra keys are ignored; a 1-D ``class_names`` fixes the class count).
* anything else: a tfds image-classification dataset with ``image`` and ``label`` features and
  ``train``/``test`` splits (``cifar10``, ``cifar100``, ``svhn_cropped``, ``stl10``, ...), read from
  ``config.data_dir`` ('' = the tfds default). An unprepared dataset is downloaded only when
  ``config.tfds_download`` is set and a download host answers within seconds; otherwise loading
  fails at once with the alternatives, rather than sitting in download retries.

Images are (N, H, W, 3) uint8. Grayscale images, (N, H, W) or (N, H, W, 1), are repeated to three
channels, so MNIST-like data runs through the same RGB augmentations unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
import zipfile

import ml_collections
import numpy as np

REQUIRED_NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# A few tfds image-classification datasets that fit in memory, for "did you mean" hints.
KNOWN_TFDS_DATASETS = (
    "cifar10",
    "cifar100",
    "svhn_cropped",
    "stl10",
    "mnist",
    "fashion_mnist",
    "kmnist",
    "emnist",
    "eurosat",
    "oxford_flowers102",
    "imagenette",
)

# Seconds to wait for a TCP connection to a download host before declaring the data unreachable.
REACHABILITY_TIMEOUT_S = 3.0


class DataError(ValueError):
    """Data that cannot be loaded or used; the message says how to fix it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data file named in the config does not exist."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Dataset:
    """A whole image-classification dataset in host memory."""

    name: str
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int32 in [0, num_classes)
    test_images: np.ndarray  # (M, H, W, 3) uint8
    test_labels: np.ndarray  # (M,) int32 in [0, num_classes)
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


# ----------------------------------------------------------------------------------------------
# Validation, shared by every source.
# ----------------------------------------------------------------------------------------------


def _as_rgb(images: np.ndarray) -> np.ndarray:
    """Repeats grayscale (N, H, W) or (N, H, W, 1) images to three channels; others unchanged."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _check_images(images: np.ndarray, split: str, source: str) -> None:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating):
            how = (
                "if the values lie in [0, 1] use (x * 255).round().astype(np.uint8); "
                "if in [0, 255] use np.clip(x, 0, 255).round().astype(np.uint8)"
            )
        else:
            how = "use np.clip(x, 0, 255).astype(np.uint8)"
        raise DataError(
            f"{source}: {key} must be uint8 (raw 0-255 pixels; the trainer normalises on the "
            f"device), got dtype {images.dtype}. Convert before saving: {how}."
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = "images must be (N, H, W, 3) RGB, or (N, H, W) / (N, H, W, 1) grayscale"
        if images.ndim == 4 and images.shape[1] in (1, 3):
            hint += "; channels-first data can be fixed with np.transpose(x, (0, 2, 3, 1))"
        raise DataError(f"{source}: {key} has shape {images.shape}; {hint}.")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise DataError(f"{source}: {key} has empty images, shape {images.shape}.")


def _check_labels(labels: np.ndarray, num_images: int, split: str, source: str) -> None:
    key = f"{split}_labels"
    if labels.ndim != 1:
        raise DataError(
            f"{source}: {key} must be 1-D (one integer class per image), got shape "
            f"{labels.shape}; for one-column labels use labels.reshape(-1), for one-hot labels "
            f"labels.argmax(-1)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{source}: {key} must be integers (class indices), got dtype {labels.dtype}; "
            f"convert with labels.astype(np.int32) if they are whole numbers, or map class names "
            f"to indices with np.unique(names, return_inverse=True)[1]."
        )
    if len(labels) != num_images:
        raise DataError(
            f"{source}: {key} has {len(labels)} entries but {split}_images has {num_images} "
            f"images; there must be exactly one label per image."
        )


def validate_arrays(
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    batch_size: int,
    source: str,
) -> None:
    """Raises DataError unless the arrays are what the trainer needs.

    Images: (N, H, W, 3) uint8, the same H and W in both splits. Labels: 1-D integers, one per
    image, in [0, num_classes). The test split must not be empty and the training split must
    hold at least one batch. ``source`` names the data in the messages (a path, a tfds name).
    """
    if len(train_images) == 0:
        raise DataError(f"{source}: the training split is empty (train_images holds no images).")
    if len(test_images) == 0:
        raise DataError(
            f"{source}: the test split is empty; evaluation needs test images (hold out part of "
            f"the training set if the data has no test split)."
        )
    for split, images, labels in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        _check_images(images, split, source)
        _check_labels(labels, len(images), split, source)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{source}: train images are {train_images.shape[1:]} but test images are "
            f"{test_images.shape[1:]}; resize one split so that both share one image size."
        )
    if len(train_images) < batch_size:
        raise DataError(
            f"{source}: {len(train_images)} training images are fewer than one batch "
            f"(batch_size={batch_size}); lower --config.batch_size to at most "
            f"{len(train_images)} or use more training data."
        )
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels.size and labels.min() < 0:
            raise DataError(
                f"{source}: {split}_labels contains {labels.min()}; class indices must be "
                f"non-negative, in [0, num_classes)."
            )
        if labels.size and labels.max() >= num_classes:
            raise DataError(
                f"{source}: {split}_labels contains {labels.max()} but there are only "
                f"{num_classes} classes; labels must lie in [0, {num_classes}) (for an npz file "
                f"fix the labels or the length of class_names)."
            )


def _make_dataset(
    name, train_images, train_labels, test_images, test_labels, *, num_classes, batch_size, source
) -> Dataset:
    """Expands grayscale, validates, and casts labels to int32."""
    train_images, test_images = _as_rgb(train_images), _as_rgb(test_images)
    validate_arrays(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        batch_size=batch_size,
        source=source,
    )
    return Dataset(
        name=name,
        train_images=np.ascontiguousarray(train_images),
        train_labels=_exact_int32(train_labels, "train_labels", source),
        test_images=np.ascontiguousarray(test_images),
        test_labels=_exact_int32(test_labels, "test_labels", source),
        num_classes=int(num_classes),
    )


def _exact_int32(labels: np.ndarray, key: str, source: str) -> np.ndarray:
    cast = labels.astype(np.int32)
    if not np.array_equal(cast, labels):
        raise DataError(f"{source}: {key} do not fit in int32 (largest {labels.max()}).")
    return cast


# ----------------------------------------------------------------------------------------------
# Synthetic.
# ----------------------------------------------------------------------------------------------

_SYNTHETIC_GRID = 4  # each class template is a 4x4 grid of colours, upsampled to the image size
_SYNTHETIC_NOISE_STD = 24.0


def synthetic_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """A learnable dataset determined by ``config.seed``.

    Each class has a fixed template: a base colour plus a coarse 4x4 colour pattern upsampled to
    the image size. An image is its class template plus independent Gaussian pixel noise, so
    classes are separable by colour and by layout while no two images are equal. Labels cycle
    through the classes (every class appears once there are at least as many images as classes)
    in a random order.
    """
    size = config.synthetic_image_size
    num_classes = config.synthetic_num_classes
    if size < 1 or num_classes < 1:
        raise DataError(
            f"synthetic data needs synthetic_image_size >= 1 and synthetic_num_classes >= 1, got "
            f"{size} and {num_classes}."
        )
    # Independent streams per part, so changing the split sizes never changes the templates.
    template_rng = np.random.default_rng([config.seed, 0])
    colours = template_rng.uniform(48.0, 208.0, size=(num_classes, 1, 1, 3))
    coarse = template_rng.normal(0.0, 40.0, size=(num_classes, _SYNTHETIC_GRID, _SYNTHETIC_GRID, 3))
    repeat = -(-size // _SYNTHETIC_GRID)
    pattern = np.repeat(np.repeat(coarse, repeat, axis=1), repeat, axis=2)[:, :size, :size]
    templates = (colours + pattern).astype(np.float32)

    def split(num_examples, stream):
        rng = np.random.default_rng([config.seed, stream])
        labels = rng.permutation(np.arange(num_examples) % num_classes)
        noise = rng.normal(0.0, _SYNTHETIC_NOISE_STD, size=(num_examples, size, size, 3))
        images = templates[labels] + noise.astype(np.float32)
        return np.clip(np.round(images), 0, 255).astype(np.uint8), labels

    train_images, train_labels = split(config.synthetic_num_train, 1)
    test_images, test_labels = split(config.synthetic_num_test, 2)
    return _make_dataset(
        "synthetic",
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        batch_size=config.batch_size,
        source="synthetic data (synthetic_num_train/synthetic_num_test)",
    )


# ----------------------------------------------------------------------------------------------
# npz.
# ----------------------------------------------------------------------------------------------


def _check_npz_file(path: str, fix: str) -> None:
    """Says what the file is when it is not an npz archive, and checks that each member's
    declared shape fits in the bytes it holds, before anything is read into memory."""
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is not a regular file, so not an npz archive; {fix}.")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(
            f"{path!r} holds a single array (.npy), not an .npz archive of named arrays; {fix}."
        )
    if not magic.startswith(b"PK"):
        what = "an empty file" if not magic else f"a file starting with {magic!r}"
        raise DataError(f"{path!r} is not an npz archive (it is {what}); {fix}.")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    _check_member_size(archive, info, path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(f"{path!r} is not a readable npz archive ({error}); {fix}.") from None


def _check_member_size(archive, info, path: str) -> None:
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(
                f"{path!r}: member {info.filename!r} is not a valid .npy array ({error})."
            ) from None
        header = f.tell()
    if dtype.hasobject:
        return  # refused without pickle when read, with its own message
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > info.file_size - header:
        raise DataError(
            f"{path!r}: member {info.filename!r} declares shape {tuple(shape)} of {dtype} "
            f"({declared:,} bytes) but holds only {info.file_size - header:,} bytes; the file "
            "is corrupt or truncated."
        )


# An npz without class_names / num_classes: the class count is the largest label + 1 only if at
# least half of [0, count) occurs as a label; sparser labels are more likely ids than classes.
MAX_CLASSES = 1_000_000


def _inferred_num_classes(labels, path: str) -> int:
    if not all(np.issubdtype(x.dtype, np.integer) and x.size for x in labels):
        return 0  # non-integer or empty labels: validate_arrays says what is wrong
    count = max(int(x.max()) for x in labels) + 1
    if min(int(x.min()) for x in labels) < 0:
        return count  # negative labels: validate_arrays says so
    distinct = len(np.unique(np.concatenate([x.astype(np.int64).ravel() for x in labels])))
    if count > 2 * distinct:
        raise DataError(
            f"{path!r}: the labels reach {count - 1} but only {distinct} distinct values occur, "
            f"so the class count ({count}) is not inferred from them. Add class_names (one name "
            "per class) or num_classes to the npz, or map the labels to 0..K-1 with "
            "np.unique(labels, return_inverse=True)[1]."
        )
    return count


def _read_npz_key(archive, key: str, path: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as error:  # object arrays need pickle, which we refuse for safety
        raise DataError(
            f"{path}: key {key!r} cannot be read without pickle ({error}); save plain arrays, "
            f"e.g. np.asarray(x, dtype=np.uint8) for images or np.asarray(names, dtype=str) for "
            f"class names."
        ) from None


def load_npz(config: ml_collections.ConfigDict) -> Dataset:
    """Arrays from the .npz file ``config.data_path`` (keys in REQUIRED_NPZ_KEYS).

    The class count is the length of an optional 1-D ``class_names`` array, else the largest
    label of either split plus one. Other keys (coarse labels, ...) are ignored.
    """
    path = os.path.expanduser(config.data_path)
    if not path:
        raise DataError("dataset='npz' needs --config.data_path=/path/to/arrays.npz")
    if not os.path.exists(path):
        raise DataFileNotFoundError(
            f"npz file {path!r} does not exist; check --config.data_path (relative paths are "
            f"taken from the working directory {os.getcwd()!r})."
        )
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; --config.data_path must name an .npz file.")
    fix = (
        "write it with np.savez(path, train_images=..., train_labels=..., test_images=..., "
        "test_labels=...)"
    )
    _check_npz_file(path, fix)
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path!r} is not an .npz file ({error}); {fix}.") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path!r} holds a single array (.npy), not an .npz archive of named arrays; {fix}."
        )
    with archive:
        missing = [key for key in REQUIRED_NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(
                f"{path!r} lacks the keys {missing}; it has {sorted(archive.files)}. An npz "
                f"dataset needs {list(REQUIRED_NPZ_KEYS)}; {fix}."
            )
        arrays = {key: _read_npz_key(archive, key, path) for key in REQUIRED_NPZ_KEYS}
        declared = None  # an explicit class count, for labels too sparse to infer it from
        if "num_classes" in archive.files:
            value = _read_npz_key(archive, "num_classes", path)
            if value.shape != () or not np.issubdtype(value.dtype, np.integer) or value < 1:
                raise DataError(
                    f"{path!r}: num_classes must be one positive integer, got {value!r}."
                )
            declared = int(value)
        class_names = None
        if "class_names" in archive.files:
            class_names = _read_npz_key(archive, "class_names", path)
            if class_names.ndim != 1:
                raise DataError(
                    f"{path!r}: class_names must be 1-D (one name per class), got shape "
                    f"{class_names.shape}."
                )

    labels = [arrays["train_labels"], arrays["test_labels"]]
    if class_names is not None:
        num_classes = len(class_names)
    elif declared is not None:
        num_classes = declared
    else:
        num_classes = _inferred_num_classes(labels, path)
    if num_classes > MAX_CLASSES:
        raise DataError(
            f"{path!r} declares {num_classes} classes, more than the {MAX_CLASSES} a linear "
            "probe here is built for; check class_names / num_classes."
        )
    return _make_dataset(
        os.path.splitext(os.path.basename(path))[0],
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
        num_classes=num_classes,
        batch_size=config.batch_size,
        source=repr(path),
    )


# ----------------------------------------------------------------------------------------------
# tfds.
# ----------------------------------------------------------------------------------------------


def download_addresses(url_infos) -> list[tuple[str, int]]:
    """The (host, port) pairs a download of these URLs connects to first.

    ``url_infos`` is a tfds builder's ``url_infos`` (a mapping keyed by URL, or None). A proxy
    set in the environment (HTTPS_PROXY, ...) is what a download would connect to, so it
    replaces the host. With no URL known, the GCS host stands in for "is there internet".
    """
    proxies = urllib.request.getproxies()
    addresses = []
    for url in url_infos or ():
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in proxies:
            parts = urllib.parse.urlsplit(proxies[parts.scheme])
        default_port = 80 if parts.scheme == "http" else 443
        address = (parts.hostname, parts.port or default_port)
        if parts.hostname and address not in addresses:
            addresses.append(address)
    return addresses or [("storage.googleapis.com", 443)]


def any_host_reachable(addresses: list[tuple[str, int]], timeout_s: float | None = None) -> bool:
    """Whether a TCP connection to any (host, port) opens within ``timeout_s`` seconds.

    ``timeout_s`` defaults to REACHABILITY_TIMEOUT_S, read at call time.

    Probes run in parallel daemon threads: a DNS lookup that hangs past the socket timeout cannot
    delay the answer or the interpreter's exit.
    """
    timeout_s = REACHABILITY_TIMEOUT_S if timeout_s is None else timeout_s
    reachable = threading.Event()

    def probe(host, port):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                reachable.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=a, daemon=True) for a in addresses]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        if reachable.wait(0.02):
            return True
    return reachable.is_set()


def _alternatives(name: str) -> str:
    return (
        "Alternatives:\n"
        f"  * on a machine with internet run `tfds build {name} --data_dir=DIR` (the tfds command "
        f"needs apache-beam installed), copy DIR here and pass --config.data_dir=DIR;\n"
        "  * save the arrays as an .npz file (train_images, train_labels, test_images, "
        "test_labels) and pass --config.dataset=npz --config.data_path=FILE.npz;\n"
        "  * for a smoke run without data pass --config.dataset=synthetic."
    )


def _data_source_arrays(source, chunk: int = 4096):
    """(images, labels) of a tfds data source: ArrayRecord files, which `as_dataset` cannot read."""
    images, labels = [], []
    for start in range(0, len(source), chunk):
        for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
            images.append(record["image"])
            labels.append(record["label"])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def load_tfds(config: ml_collections.ConfigDict) -> Dataset:
    """A tfds image-classification dataset (``image``/``label`` features, train/test splits)."""
    try:
        import tensorflow_datasets as tfds  # heavy; synthetic and npz runs never import it
    except ImportError as error:  # an optional dependency (pyproject.toml's extra `tfds`)
        raise DataError(
            f"dataset {config.dataset!r} is read with tensorflow-datasets and TensorFlow, which "
            f'are not installed ({error}). Install them with `pip install -e ".[tfds]"`, or '
            f"use --config.dataset=npz --config.data_path=FILE.npz or --config.dataset=synthetic."
        ) from error

    name = config.dataset
    data_dir = config.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, KNOWN_TFDS_DATASETS, n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        where = repr(data_dir) if data_dir else "tfds's default data_dir"
        raise DataError(
            f"unknown dataset {name!r}.{hint} config.dataset takes 'synthetic', 'npz' (with "
            f"--config.data_path), a tfds image-classification name such as "
            f"{', '.join(KNOWN_TFDS_DATASETS[:6])} (`tfds.list_builders()` lists all), or a "
            f"dataset prepared in --config.data_dir ({where} holds no "
            f"{name}/<version>/dataset_info.json)."
        ) from None

    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"tfds dataset {name!r} has features {sorted(features.keys())}, but an "
            f"image-classification dataset needs 'image' and 'label'; convert it to an .npz file "
            f"and pass --config.dataset=npz --config.data_path=FILE.npz."
        )

    if not builder.is_prepared():
        where = f"in {builder.data_dir!r}"
        if not config.tfds_download:
            raise DataError(
                f"tfds dataset {name!r} is not prepared {where} and config.tfds_download=False "
                f"forbids downloading it. Set --config.data_dir to where it is prepared, or "
                f"allow the download with --config.tfds_download=True.\n{_alternatives(name)}"
            )
        addresses = download_addresses(builder.url_infos)
        if not any_host_reachable(addresses):
            hosts = ", ".join(f"{host}:{port}" for host, port in addresses)
            raise DataError(
                f"tfds dataset {name!r} is not prepared {where} and cannot be downloaded here: "
                f"no download host ({hosts}) accepted a connection within "
                f"{REACHABILITY_TIMEOUT_S:g} s.\n{_alternatives(name)}"
            )
        try:
            builder.download_and_prepare()
        except Exception as error:  # any failure: the remedies are the same
            raise DataError(
                f"downloading and preparing tfds dataset {name!r} {where} failed: "
                f"{type(error).__name__}: {error}\n{_alternatives(name)}"
            ) from error

    available = set(builder.info.splits.keys())  # empty when tfds does not know them (mocks)
    if available and not {"train", "test"} <= available:
        raise DataError(
            f"tfds dataset {name!r} has splits {sorted(available)}, but 'train' and 'test' are "
            f"needed; build an .npz file with a held-out test split and pass "
            f"--config.dataset=npz --config.data_path=FILE.npz."
        )

    def split_arrays(split):
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            return _data_source_arrays(builder.as_data_source(split=split))  # no tf.data reader
        # Fixed-size chunks rather than batch_size=-1: that batches by the split's recorded size,
        # and where the size is unknown (mock_data) by sys.maxsize, which aborts TensorFlow.
        images, labels = [], []
        for batch in tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096)):
            images.append(batch["image"])
            labels.append(batch["label"])
        if not images:
            return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
        return np.concatenate(images), np.concatenate(labels)

    train_images, train_labels = split_arrays("train")
    test_images, test_labels = split_arrays("test")
    num_classes = getattr(features["label"], "num_classes", None)
    if num_classes is None:  # a plain integer label feature
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    return _make_dataset(
        name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        batch_size=config.batch_size,
        source=f"tfds dataset {name!r}",
    )

"""The host side of streaming input: sources, robust decoding, torchvision's crops, sharded order.

For datasets that do not fit in memory (ImageNet: 1.28 M JPEGs, ~140 GB). Each process reads,
decodes and crops only its own share of every global batch, with grain's threads, and hands uint8
crops to the device, where colour jitter, grayscale, flip and normalisation run as for resident
data (`augment.two_views` skips its crop when given two cropped views).

Determinism, whatever the thread scheduling or the process count:

* the order of epoch e is a permutation drawn from (seed, e); global batch s is positions
  [s·B, (s+1)·B) of its epoch's order, and process p reads the p-th of `process_count` equal
  slices of it, so the same images meet in the same global batch on any number of processes;
* the crop boxes of the image at place j of global batch s come from row j of a NumPy stream
  seeded with (seed, s);
* the stream is a pure function of the step: resuming at step s rebuilds it from s.

Sources (`open_splits`): an image folder in torchvision's ImageFolder layout, a prepared tfds
dataset read at random through its data source (ArrayRecord files), either restricted to listed
classes, or in-memory arrays (a resident dataset forced to stream, for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import logging
import math
import os
import queue
import stat
import tempfile
import threading
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from simco_jax import data

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# torchvision's RandomResizedCrop defaults; scale comes from min_scale/max_scale.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# Independent NumPy streams under one seed.
_ORDER_STREAM, _CROP_STREAM = 0, 1
# How many files an error message names.
_SHOW_FILES = 5


# ----------------------------------------------------------------------------------------------
# Sources: random access to (RGB PIL image, label).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """A random-access split. `load(i)` returns (RGB PIL image, label) or raises on a bad file."""

    name: str  # for messages: a directory, 'imagenet2012[train]', ...
    size: int
    load: Callable[[int], tuple[Image.Image, int]]
    describe: Callable[[int], str]  # example i for messages (its path)
    paths: tuple[str, ...] = ()  # the image folder's files, in index order
    identity: str = ""  # the fingerprint resuming compares ('' = the name's, see `inputs`)

    def __len__(self) -> int:
        return self.size


def decode_rgb(file) -> Image.Image:
    """Decodes any PIL-readable image (CMYK/grayscale JPEG, a PNG named .JPEG) to RGB.

    As torchvision's `pil_loader`: `Image.open(f).convert("RGB")`; the format comes from the
    bytes, not the file name. A path is opened as `open_regular` does. Raises OSError/ValueError/
    SyntaxError for unreadable data, truncated files included (PIL's LOAD_TRUNCATED_IMAGES stays
    False).
    """
    with contextlib.ExitStack() as stack:
        if isinstance(file, str):
            file = stack.enter_context(open_regular(file))
        with Image.open(file) as image:
            return image.convert("RGB")


def open_regular(path: str):
    """`path` opened for binary reading if it is a regular file, else OSError, without blocking.

    The open is non-blocking, so a FIFO put where an image was (no writer: an ordinary open
    would wait forever) or a device is refused at once rather than read or waited on.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _dir_key(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _list_class_folder(directory: str, seen_dirs: set, skipped: list) -> list[tuple[str, int]]:
    """(path, size) of the image files under `directory`, recursively, in torchvision's
    make_dataset order (os.walk with links followed, names sorted), each read from disk once.

    A directory reached a second time (a link cycle, or two links to one directory: the same
    device and inode) is not entered again, and an entry with an image name that is not a
    regular file (a FIFO, socket, device, broken link) is left out; both go to `skipped` as
    (path, why). Only stat calls: nothing here opens a file.
    """
    found = []  # (directory, its files); torchvision sorts os.walk's triples by directory

    def walk(path):
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as error:
            skipped.append((path, error.strerror or str(error)))
            return
        subdirs, files = [], []
        found.append((path, files))
        for entry in entries:
            try:
                if entry.is_dir():
                    subdirs.append(entry)
                elif _is_image(entry.name):
                    info = entry.stat()  # follows a link: the kind and size of its target
                    if stat.S_ISREG(info.st_mode):
                        files.append((entry.path, info.st_size))
                    else:
                        skipped.append((entry.path, "not a regular file"))
            except OSError as error:  # a broken link, a link loop, a vanished file
                if _is_image(entry.name):
                    skipped.append((entry.path, error.strerror or str(error)))
        for entry in subdirs:
            try:
                info = entry.stat()
            except OSError as error:
                skipped.append((entry.path, error.strerror or str(error)))
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen_dirs:
                skipped.append(
                    (entry.path, "a directory already read (a link cycle or a 2nd link)")
                )
                continue
            seen_dirs.add(key)
            walk(entry.path)

    seen_dirs.add(_dir_key(directory))
    walk(directory)
    return [file for _, files in sorted(found, key=lambda d: d[0]) for file in files]


def image_folder_split(
    directory: str, classes: list[str] | None = None, *, select: list[str] | None = None
) -> tuple[Split, list]:
    """One split of an ImageFolder tree (`directory/<class>/*.JPEG`); labels in sorted class order.

    `select`: only these class folders are used (e.g. ImageNet-100), each of which must exist;
    `classes`: the classes the split must have (the training split's, for validation).
    Raises DataError for a missing or empty directory and for a class folder without images.
    """
    if not os.path.isdir(directory):
        raise data.DataError(
            f"image folder {directory!r} does not exist; --config.data_path=ROOT must hold "
            f"ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (torchvision's ImageFolder)."
        )
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not found:
        raise data.DataError(
            f"image folder {directory!r} has no class folders; expected {directory}/<class>/*.JPEG."
        )
    if select is not None:
        missing = sorted(set(select) - set(found))
        if missing:
            raise data.DataError(
                f"{directory!r} lacks {len(missing)} of the {len(set(select))} classes of "
                f"config.class_list, e.g. {missing[:_SHOW_FILES]}; every listed class needs a "
                f"folder in both splits."
            )
        found = sorted(set(select))
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise data.DataError(
            f"the classes of {directory!r} differ from the training classes: missing "
            f"{missing[:_SHOW_FILES]}{' ...' if len(missing) > _SHOW_FILES else ''}, extra "
            f"{extra[:_SHOW_FILES]}{' ...' if len(extra) > _SHOW_FILES else ''}; both splits need "
            f"the same class folders (labels are their sorted order)."
        )
    files, labels, skipped = [], [], []
    # The split, the directories above it and its class folders are read as themselves only:
    # a link to one is skipped (a link to an ancestor is a cycle).
    ancestors, path = [], os.path.realpath(directory)
    while path not in ancestors:
        ancestors.append(path)
        path = os.path.dirname(path)
    class_dirs = [os.path.join(directory, name) for name in found]
    seen_dirs = {_dir_key(p) for p in ancestors + class_dirs}
    for label, name in enumerate(found):
        listed = _list_class_folder(os.path.join(directory, name), seen_dirs, skipped)
        if not listed:
            raise data.DataError(
                f"class folder {os.path.join(directory, name)!r} holds no images (extensions "
                f"{', '.join(IMG_EXTENSIONS)}); remove it or add its images."
            )
        files.extend(listed)
        labels.extend([label] * len(listed))
    if skipped:
        log.warning(
            "%s: %d entries skipped, each read at most once and only regular image files read: "
            "%s%s",
            directory,
            len(skipped),
            "; ".join(f"{p} ({why})" for p, why in skipped[:_SHOW_FILES]),
            " ..." if len(skipped) > _SHOW_FILES else "",
        )
    paths = tuple(p for p, _ in files)
    labels = np.asarray(labels, np.int32)

    def load(i):
        return decode_rgb(paths[i]), int(labels[i])

    identity = folder_identity(directory, files)
    split = Split(directory, len(paths), load, lambda i: paths[i], paths=paths, identity=identity)
    return split, found


def folder_identity(directory: str, files: list[tuple[str, int]], sample: int = 32) -> str:
    """The training folder's fingerprint in the checkpoint record: what resuming compares.

    It covers the count, the file names relative to `directory` (a moved or copied folder stays
    the same), every file's size, and every byte of `sample` files at evenly spaced places. So it
    catches an added, removed, renamed or relabelled (moved between classes) image, any image
    whose size changed (re-encoded, resized, truncated, replaced by another picture), and any
    change to a sampled file; it misses a same-size edit of a file outside the sample.
    Modification times are left out on purpose: a copy without them (`cp -r`) is the same data.
    Costs one stat per file (taken while listing) and reading `sample` files.
    """
    names = "\n".join(os.path.relpath(p, directory) for p, _ in files)
    sizes = np.asarray([size for _, size in files], np.int64)
    content, picked = 0, np.unique(np.linspace(0, len(files) - 1, sample).astype(int))
    for index in picked:
        path = files[index][0]
        try:
            with open_regular(path) as f:
                content = zlib.crc32(f.read(), content)
        except OSError as error:  # replaced when read in training; named in the fingerprint
            content = zlib.crc32(f"{path}: {error.strerror}".encode(), content)
    return (
        f"{len(files)} images, crc32 {zlib.crc32(names.encode()):08x} of their names, "
        f"{zlib.crc32(sizes.tobytes()):08x} of their sizes, {content:08x} of {len(picked)} files"
    )


def array_split(name: str, images: np.ndarray, labels: np.ndarray) -> Split:
    """In-memory uint8 (N, H, W, 3) arrays as a split (a resident dataset forced to stream)."""

    def load(i):
        return Image.fromarray(images[i]), int(labels[i])

    return Split(name, len(images), load, lambda i: f"{name}[{i}]")


def subset(split: Split, indices: np.ndarray) -> Split:
    """The examples `indices` of `split`, in that order, as a split of their own."""
    indices = np.asarray(indices, np.int64)
    paths = tuple(split.paths[i] for i in indices) if split.paths else ()
    return Split(
        f"{split.name} ({len(indices)} of {len(split)})",
        len(indices),
        lambda i: split.load(int(indices[i])),
        lambda i: split.describe(int(indices[i])),
        paths=paths,
    )


def _prepare_hint(name: str) -> str:
    return (
        f"Streaming reads the ArrayRecord format: prepare it with `tfds.builder({name!r}, "
        f"data_dir=DIR, file_format='array_record').download_and_prepare()` (imagenet2012: "
        f"download_config=tfds.download.DownloadConfig(manual_dir=DIR_WITH_THE_TARS); the `tfds "
        f"build ... --file_format=array_record` command does the same but needs apache-beam), "
        f"then pass --config.data_dir=DIR."
    )


def open_tfds(name: str, data_dir: str | None):
    """The builder of a tfds dataset prepared in `data_dir` for random access.

    A dataset that tfds has no code for (a user's own, or one prepared by a newer tfds) is found
    from its files, `DIR/NAME/VERSION/dataset_info.json` (`tfds.builder` falls back to
    `read_only_builder.builder_from_files`). Raises DataError for an unknown or unprepared
    dataset, one without random access, or one without `image` and ClassLabel `label` features.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        where = repr(data_dir) if data_dir else "tfds's default data_dir"
        raise data.DataError(
            f"tfds dataset {name!r} is neither a tfds builder nor prepared in {where} (no "
            f"{name}/<version>/dataset_info.json there). {_prepare_hint(name)}"
        ) from None
    if not builder.is_prepared():
        raise data.DataError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}. {_prepare_hint(name)}"
        )
    formats = builder.info.available_file_formats()
    if not formats & tfds.core.file_adapters.FileFormat.with_random_access():
        raise data.DataError(
            f"tfds dataset {name!r} is prepared in {builder.data_dir!r} as "
            f"{', '.join(sorted(f.value for f in formats))}, which tfds cannot read at random; "
            f"streaming needs ArrayRecord: prepare it again with file_format='array_record' in "
            f"another data_dir, or convert it with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`."
        )
    features = builder.info.features
    if "image" not in features or not isinstance(
        features["label"] if "label" in features else None, tfds.features.ClassLabel
    ):
        raise data.DataError(
            f"tfds dataset {name!r} has features {sorted(features.keys())}; streaming needs an "
            f"'image' and a ClassLabel 'label'."
        )
    return builder


def tfds_split(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    select: list[str] | None = None,
    label_names: list[str] | None = None,
) -> Split:
    """A split of a prepared tfds dataset, read at random through its ArrayRecord data source;
    the images stay encoded until a worker decodes them.

    `select`: only the records whose ClassLabel name is listed (e.g. ImageNet-100), labelled by
    the names' sorted order, as an image folder of those classes is labelled; each must be a
    class of the dataset. Which records they are comes from one scan of the split's labels,
    cached (`class_records`). The split's i-th example is the i-th selected record, so the
    global order and the sharding are those of any other split of that size.

    `label_names`: the split evaluates a model trained on another dataset, whose ClassLabel
    names these are in label order (imagenet_v2 evaluating imagenet2012): each label is mapped
    by its name to its place there, and every name must be there. With `select` too, a listed
    class this dataset lacks simply has no records in it.
    """
    import tensorflow_datasets as tfds

    builder = open_tfds(name, data_dir)
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    title, records, relabel = f"{name}[{split}]", None, None
    names = builder.info.features["label"].names
    if label_names is not None and select is None:
        extra = sorted(set(names) - set(label_names))
        if extra:
            raise data.DataError(
                f"tfds dataset {name!r} has {len(extra)} classes that the training dataset "
                f"lacks, e.g. {extra[:_SHOW_FILES]}; an evaluation dataset's ClassLabel names "
                f"must be training class names (as imagenet_v2's are imagenet2012's)."
            )
        place = {c: i for i, c in enumerate(label_names)}
        relabel = np.asarray([place[c] for c in names], np.int64)
    if select is not None:
        missing = sorted(set(select) - set(names))
        if missing and label_names is None:
            raise data.DataError(
                f"tfds dataset {name!r} lacks {len(missing)} of the {len(set(select))} classes "
                f"of config.class_list, e.g. {missing[:_SHOW_FILES]}; its labels are named "
                f"like {names[:2]}."
            )
        classes = sorted(set(select))
        relabel = np.full(len(names), -1, np.int64)
        present = [c for c in classes if c in names]
        relabel[[names.index(c) for c in present]] = [classes.index(c) for c in present]
        records = class_records(builder, split, source, relabel >= 0)
        # The name is the checkpoint's data fingerprint here (no file paths): it names the list.
        listed = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]
        title = f"{name}[{split}], the {len(classes)} classes of config.class_list ({listed})"

    def load(i):
        record = source[i if records is None else int(records[i])]
        label = int(record["label"])
        if relabel is not None:
            if relabel[label] < 0:  # not an OSError/ValueError: no unreadable-file replacement
                raise RuntimeError(
                    f"{name}[{split}] record {records[i]} has label {label}, which "
                    f"config.class_list does not select: the cached selection is stale; delete "
                    f"{_selection_file(builder, split, relabel >= 0)} in "
                    f"{selection_cache_dirs(builder)} and rerun."
                )
            label = int(relabel[label])
        return decode_rgb(io.BytesIO(record["image"])), label

    def describe(i):
        return f"{name}[{split}][{i if records is None else int(records[i])}]"

    size = len(source) if records is None else len(records)
    return Split(title, size, load, describe)


def _selection_file(builder, split: str, selected: np.ndarray) -> str:
    """The cache file's name: dataset, config, version, split and a hash of the selected ids."""
    digest = hashlib.sha256(np.flatnonzero(selected).astype(np.int64).tobytes()).hexdigest()
    return f"{builder.info.full_name.replace('/', '-')}-{split}-classes-{digest[:16]}.npy"


def selection_cache_dirs(builder) -> list[str]:
    """Where a class selection is cached, first choice first: beside the prepared data (its
    version directory) when that is a local directory, and the user's cache directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places = [os.path.join(cache, "simco_jax", "class_selections")]
    data_dir = os.fspath(builder.data_dir)
    return places if "://" in data_dir else [data_dir, *places]


def class_records(builder, split: str, source, selected: np.ndarray) -> np.ndarray:
    """Indices of the records of `split` whose label id is `selected`, ascending.

    Finding them reads every record once (ImageNet's whole training split), so they are cached
    as .npy keyed by dataset, version, split and the selected ids, written atomically (a
    temporary file renamed into place: processes that compute it at once write the same bytes).
    """
    file_name = _selection_file(builder, split, selected)
    places = selection_cache_dirs(builder)
    for place in places:
        records = _load_records(os.path.join(place, file_name), len(source))
        if records is not None:
            return records
    log.info("reading the labels of %s[%s] to select config.class_list", builder.name, split)
    records = np.flatnonzero(selected[read_labels(source)])
    for place in places:
        try:
            _save_atomically(os.path.join(place, file_name), records)
            log.info("cached the %d selected records in %s", len(records), place)
            break
        except OSError as error:
            log.info("cannot cache the class selection in %s (%s)", place, error)
    return records


def read_labels(source, chunk: int = 1024) -> np.ndarray:
    """Every record's label, in record order (images are read but not decoded)."""
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        labels[start : start + len(keys)] = [r["label"] for r in source.__getitems__(keys)]
    return labels


def _load_records(path: str, size: int) -> np.ndarray | None:
    """A cached selection, or None if absent or not a valid one for a split of `size`."""
    try:
        records = np.load(path)
    except (OSError, ValueError):
        return None
    valid = (
        records.ndim == 1
        and records.dtype == np.int64
        and np.all(np.diff(records) > 0)
        and (len(records) == 0 or (records[0] >= 0 and records[-1] < size))
    )
    return records if valid else None


def _save_atomically(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from the other users of the data
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# ----------------------------------------------------------------------------------------------
# Host transforms (torchvision semantics on PIL images).
# ----------------------------------------------------------------------------------------------


def crop_box(uniforms: np.ndarray, height: int, width: int, scale=(0.08, 1.0)):
    """torchvision's `RandomResizedCrop.get_params`: (top, left, h, w).

    Ten tries of an area fraction ~ U(scale) and a log-ratio ~ U(log 3/4, log 4/3); the first box
    that fits is placed uniformly; otherwise the central crop with the ratio clamped to [3/4, 4/3].
    `uniforms`: (CROP_ATTEMPTS, 4) numbers in [0, 1) per try, for the area, the ratio, the top and
    the left, drawn in advance (see `crop_uniforms`).
    """
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for u_area, u_ratio, u_top, u_left in uniforms.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box, size: int) -> np.ndarray:
    """torchvision's `F.resized_crop` on a PIL image: crop, then PIL's antialiased bilinear resize.

    Crop first, as torchvision does: a resize with `box=` would also take taps from outside it.
    """
    top, left, h, w = box
    cropped = image.crop((left, top, left + w, top + h))
    return np.asarray(cropped.resize((size, size), Image.BILINEAR))


def eval_size(crop_size: int) -> int:
    """The shorter side before the centre crop: 256 for 224, in proportion otherwise."""
    return int(round(crop_size * 256 / 224))


def center_crop_eval(image: Image.Image, crop_size: int) -> np.ndarray:
    """torchvision's Resize(eval_size) (shorter side, bilinear) then CenterCrop(crop_size)."""
    width, height = image.size
    short, long = sorted((width, height))
    size = eval_size(crop_size)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - crop_size) / 2.0))
    left = int(round((new_w - crop_size) / 2.0))
    return np.asarray(image.crop((left, top, left + crop_size, top + crop_size)))


# ----------------------------------------------------------------------------------------------
# Unreadable files: replaced deterministically, logged, counted, bounded.
# ----------------------------------------------------------------------------------------------


class UnreadableFiles:
    """Loads examples, replacing an unreadable one by the next readable index (mod N).

    Readability is a property of the files, so the replacement is the same on every run and every
    process: batches stay full and deterministic. Each bad file is logged once with its error;
    `take_count(epoch)` says how many were met in an epoch. More than `max_fraction` of the split
    unreadable (counted by this process) stops with a DataError naming the first few files.
    """

    def __init__(self, split: Split, max_fraction: float):
        self.split = split
        self.limit = max_fraction * len(split)
        self.bad: dict[int, str] = {}  # index -> error, in the order met
        self.per_epoch: dict[int, int] = {}
        self.lock = threading.Lock()

    def load(self, index: int, epoch: int = 0):
        for attempt in range(len(self.split)):
            candidate = (index + attempt) % len(self.split)
            try:
                return self.split.load(candidate)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self._record(candidate, epoch, error)
        raise data.DataError(f"no readable image in {self.split.name!r}")

    def _record(self, index, epoch, error):
        with self.lock:
            self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + 1
            if index in self.bad:
                return
            self.bad[index] = f"{type(error).__name__}: {error}"
            log.warning(
                "unreadable image %s (%s); replaced by the next readable one",
                self.split.describe(index),
                self.bad[index],
            )
            if len(self.bad) > self.limit:
                first = [f"{self.split.describe(i)} ({e})" for i, e in self.bad.items()]
                raise data.DataError(
                    f"more than {self.limit / len(self.split):.2%} of {self.split.name!r} is "
                    f"unreadable ({len(self.bad)} files so far), e.g. {first[:_SHOW_FILES]}. "
                    f"Fix or remove them, or raise --config.max_unreadable_fraction."
                )

    def take_count(self, epoch: int) -> int:
        with self.lock:
            return self.per_epoch.pop(epoch, 0)


# ----------------------------------------------------------------------------------------------
# The global order and this process's share of it.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled order of an epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Process `index` of `count` reads slice `index` of every global batch."""

    index: int
    count: int

    def local(self, global_batch: int) -> int:
        if global_batch % self.count:
            raise data.DataError(
                f"batch {global_batch} does not split evenly over {self.count} processes"
            )
        return global_batch // self.count


def train_example_index(step: int, j: int, *, seed, num_examples, global_batch, shard: Sharding):
    """Dataset index of the j-th image of this process's share of global batch `step`."""
    steps_per_epoch = num_examples // global_batch
    epoch, in_epoch = divmod(step, steps_per_epoch)
    position = in_epoch * global_batch + shard.index * shard.local(global_batch) + j
    return epoch, int(epoch_order(seed, epoch, num_examples)[position])


@functools.lru_cache(maxsize=64)
def crop_uniforms(seed: int, step: int, global_batch: int, shard: Sharding) -> np.ndarray:
    """(local batch, 2 views, CROP_ATTEMPTS, 4) uniforms for this process's crops at `step`.

    Rows of one (seed, step) stream over the whole global batch: an image's crops depend only on
    (seed, step, its place in the batch), never on threads or the process count. One stream per
    step rather than one per image: seeding a generator costs more than cropping a small image.
    """
    local = shard.local(global_batch)
    per_image = 2 * CROP_ATTEMPTS * 4
    bits = np.random.PCG64(np.random.SeedSequence([seed, _CROP_STREAM, step]))
    bits.advance(shard.index * local * per_image)  # a double is one 64-bit draw: skip the rows
    uniforms = np.random.Generator(bits).random((local, 2, CROP_ATTEMPTS, 4))  # of lower ones
    uniforms.flags.writeable = False  # shared by every caller through the cache
    return uniforms


def train_example(
    step: int, j: int, *, files: UnreadableFiles, seed, global_batch, shard, crop_size, scale
):
    """Two RandomResizedCrop views of one decode, as uint8, and the label."""
    epoch, index = train_example_index(
        step, j, seed=seed, num_examples=len(files.split), global_batch=global_batch, shard=shard
    )
    image, label = files.load(index, epoch)
    uniforms = crop_uniforms(seed, step, global_batch, shard)[j]
    width, height = image.size
    view1 = resized_crop(image, crop_box(uniforms[0], height, width, scale), crop_size)
    view2 = resized_crop(image, crop_box(uniforms[1], height, width, scale), crop_size)
    return {"view1": view1, "view2": view2, "label": np.int32(label), "step": np.int32(step)}


def eval_indices(num_examples: int, global_batch: int, shard: Sharding) -> np.ndarray:
    """This process's share of every evaluation batch: (batches, local) split indices, −1 for
    padding.

    Eval batch b is positions [b·B, (b+1)·B) of the split in order; process p reads the p-th of
    `shard.count` equal slices of it, and positions past the split's end are padding. Every
    process gets the same number of batches, so a process whose slices have run out still joins
    each batch's collectives (with padding only), and the real indices of all processes together
    are every index of the split exactly once.
    """
    local = shard.local(global_batch)
    batches = -(-num_examples // global_batch)
    positions = (
        np.arange(batches)[:, None] * global_batch + shard.index * local + np.arange(local)[None]
    )
    return np.where(positions < num_examples, positions, -1)


def eval_example(index: int, *, files: UnreadableFiles, crop_size):
    """Example `index` of the split, centre-cropped; index −1 is padding (zeros, label −1)."""
    if index < 0:
        return {"image": np.zeros((crop_size, crop_size, 3), np.uint8), "label": np.int32(-1)}
    image, label = files.load(index)
    return {"image": center_crop_eval(image, crop_size), "label": np.int32(label)}


def grain_batches(example_fn, start: int, stop: int, local_batch: int, threads: int):
    """Iterator over batches of `example_fn(k)` for k in [start, stop), in order.

    Each batch is built whole by one of `threads` grain threads, `max(2, threads)` batches
    ahead. A batch, not an image, is grain's unit of work: handing every image to the thread
    pool cost as much CPU time as decoding a small image, CPU time the step itself needs where
    the host also computes the step.
    """
    import grain

    if start % local_batch or stop % local_batch:
        raise ValueError(f"[{start}, {stop}) is not whole batches of {local_batch}")

    def batch(b):
        examples = [example_fn(b * local_batch + j) for j in range(local_batch)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    dataset = grain.MapDataset.range(start // local_batch, stop // local_batch).map(batch)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))
    return iter(dataset.to_iter_dataset(options))


class Prefetcher:
    """Runs `produce(item)` over an iterator in a thread, `depth` items ahead (device transfer
    overlaps the step). Errors reach the consumer; `close()` stops the thread."""

    _DONE = object()

    def __init__(self, iterator, produce, depth: int = 2):
        self.queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()

        def run():
            try:
                for item in iterator:
                    if not self._put(produce(item)):
                        return
                self._put(self._DONE)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                self._put(error)

        self.thread = threading.Thread(target=run, daemon=True, name="simco-prefetch")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=10)

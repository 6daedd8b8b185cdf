"""The input seam: where the trainer's and the evaluators' batches come from.

`create(config, mesh)` returns an `Inputs` with a training input and two evaluation sources, in one
of two modes (`config.input_mode`; 'auto' picks by the dataset's size):

* **resident** (CIFAR, STL-10, SVHN, npz, synthetic): the whole training set lives replicated on
  every device as uint8; the jitted step gathers its batch by index from the epoch's order
  (`gather_batch`) and augments it, crop included, on the device.
* **streaming** (an image folder, ImageNet through tfds, anything over
  `sources.RESIDENT_MAX_BYTES`): each
  process decodes and crops its own share of every global batch on the host (`streaming`), and
  the global batch is assembled from the processes' shares with
  `jax.make_array_from_process_local_data`; the device does the rest of the augmentation.

The training input's interface is what the train loop uses: `batches(step)` gives the device data
of the chunk starting at `step`, `select(state, data, i)` (traced inside the jitted chunk) the
images and labels of its i-th step, `position(step)` what the checkpoint records about the stream.
An evaluation source's `batches()` yields (images, labels, start): the eval batch is
`dynamic_slice(images, start, batch)`. Which sources exist, and what each can do, is the table
in `sources`.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np

from simco_jax import checkpointing, data, parallel, sources, streaming

log = logging.getLogger(__name__)

# Independent random streams under the run's root key (train_step folds others from it).
_DATA_STREAM = 0
_KNN_BANK_STREAM = 2  # a NumPy stream under config.seed (streaming's are 0 and 1)


class Inputs(NamedTuple):
    name: str
    mode: str  # 'resident' | 'streaming'
    num_classes: int
    num_train: int
    train: Any  # ResidentTrain | StreamingTrain
    test: Any  # ResidentEval | StreamingEval: the test (or validation) split
    train_eval: Any  # the training split with the evaluation transform (offline kNN bank)
    knn_bank: Any  # the kNN monitor's bank: `train_eval`, or its subset (`knn_bank_indices`)
    image_shape: tuple  # (H, W, C) the network's input is made from
    identity: str  # a fingerprint of the training set, for the checkpoint's record

    def close(self):
        self.train.close()


def resolve_mode(config) -> str:
    """'resident' or 'streaming': `config.input_mode`, or what the source picks when 'auto'."""
    if config.input_mode != "auto":
        return config.input_mode
    return sources.get(config.dataset).mode(config)


def create(config, mesh, *, order_seed: int | None = None) -> Inputs:
    """The run's inputs in the mode `resolve_mode` picks; data errors are raised here, before
    anything compiles. `order_seed`: the seed of a streamed order and crops (default
    `config.seed`; the resident order comes from the train state's key)."""
    mode = resolve_mode(config)
    is_tfds = sources.get(config.dataset).tfds
    if config.eval_dataset and (mode == "resident" or not is_tfds):
        what = "is loaded resident" if is_tfds else "is not a tfds dataset"
        raise data.DataError(
            f"config.eval_dataset={config.eval_dataset!r} replaces the test split of a streamed "
            f"tfds dataset only, and dataset={config.dataset!r} {what} here: set "
            f"eval_dataset='', or for a tfds dataset --config.input_mode=streaming (an image "
            f"folder, npz or synthetic data evaluated on another dataset is not supported)."
        )
    if mode == "resident":
        if config.class_list:
            raise data.DataError(
                f"dataset={config.dataset!r} is loaded resident here, and config.class_list "
                f"applies to streamed data only (an image folder's class folders, a tfds "
                f"dataset's ClassLabel names): set class_list='', or for a tfds dataset "
                f"--config.input_mode=streaming."
            )
        dataset = sources.load_dataset(config)
        batch = config.eval_batch_size
        bank = knn_bank_indices(config, len(dataset.train_labels))
        train_eval = ResidentEval(dataset.train_images, dataset.train_labels, batch, mesh)
        return Inputs(
            name=dataset.name,
            mode="resident",
            num_classes=dataset.num_classes,
            num_train=len(dataset.train_labels),
            train=ResidentTrain(config, dataset, mesh),
            test=ResidentEval(dataset.test_images, dataset.test_labels, batch, mesh),
            train_eval=train_eval,
            knn_bank=train_eval
            if bank is None
            else ResidentEval(dataset.train_images[bank], dataset.train_labels[bank], batch, mesh),
            image_shape=dataset.image_shape,
            identity=checkpointing.data_identity(dataset.train_images, dataset.train_labels),
        )
    name, train_split, test_split, num_classes = open_splits(config)
    if len(train_split) < config.batch_size:
        raise data.DataError(
            f"{train_split.name}: {len(train_split)} training images are fewer than one batch "
            f"(batch_size={config.batch_size})."
        )
    threads = config.input_threads or os.cpu_count() or 1
    # Eval batches split evenly over the devices: eval_batch_size rounded up to a multiple.
    eval_batch = -(-config.eval_batch_size // mesh.size) * mesh.size

    def eval_source(split):
        return StreamingEval(split, config, eval_batch, mesh, threads)

    bank = knn_bank_indices(config, len(train_split))
    train_eval = eval_source(train_split)

    return Inputs(
        name=name,
        mode="streaming",
        num_classes=num_classes,
        num_train=len(train_split),
        train=StreamingTrain(config, train_split, mesh, threads, seed=order_seed),
        test=eval_source(test_split),
        train_eval=train_eval,
        knn_bank=train_eval if bank is None else eval_source(streaming.subset(train_split, bank)),
        image_shape=(config.crop_size, config.crop_size, 3),
        identity=_split_identity(train_split),
    )


def knn_bank_indices(config, num_train: int) -> np.ndarray | None:
    """The training examples of the kNN monitor's bank, sorted; None for all of them.

    `config.knn_bank_size` examples drawn without replacement from `config.seed` (a stream of
    its own): the same subset at every evaluation, on every process, after every resume.
    """
    size = config.get("knn_bank_size", 0)
    if not size or size >= num_train:
        return None
    rng = np.random.default_rng([config.seed, _KNN_BANK_STREAM])
    return np.sort(rng.choice(num_train, size, replace=False))


def _split_identity(split: streaming.Split) -> str:
    """The split's own fingerprint (an image folder's: `streaming.folder_identity`), else its
    size and a CRC of its name (a tfds split: its name and version say what it holds)."""
    if split.identity:
        return split.identity
    crc = zlib.crc32(split.name.encode())
    return f"{len(split)} images, crc32 {crc:08x} of their names"


def read_class_list(path: str) -> list[str]:
    """The class names of a class-list file (one per line; blank lines and '#' comments skipped)."""
    try:
        with open(os.path.expanduser(path)) as f:
            names = [line.split("#")[0].strip() for line in f]
    except OSError as error:
        raise data.DataError(f"cannot read config.class_list={path!r} ({error.strerror})") from None
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise data.DataError(f"config.class_list={path!r} must list distinct class names")
    return names


def open_splits(config) -> sources.Splits:
    """(name, train split, test split, num_classes) of a streamed dataset, from its source.

    `config.class_list` selects classes of an image folder (class folders) or of a tfds dataset
    (ClassLabel names, e.g. imagenet2012's WordNet IDs), labelled in sorted name order either way.
    `config.eval_dataset` names another tfds dataset whose `validation` (else `test`) split is
    the test split, its labels mapped by ClassLabel name to the training dataset's (imagenet_v2,
    imagenet_a, imagenet_r name theirs as imagenet2012 does).
    """
    select = read_class_list(config.class_list) if config.class_list else None
    return sources.open_splits(config, select)


# ----------------------------------------------------------------------------------------------
# Resident.
# ----------------------------------------------------------------------------------------------


class ResidentTrain:
    """The whole training set replicated on the devices; batches gathered inside the chunk."""

    fuses_steps = True  # the chunk can scan several steps: all their data is on the device

    def __init__(self, config, dataset, mesh):
        self.dataset = dataset
        self.batch = config.batch_size
        self.seed = config.seed
        self.num_examples = len(dataset.train_labels)
        self.steps_per_epoch = self.num_examples // self.batch
        self.sharding = parallel.replicated(mesh)
        divisible = self.batch % mesh.size == 0  # always in training; maybe not in linear eval
        self.batch_sharding = parallel.batch_sharded(mesh) if divisible else self.sharding
        self.data = parallel.put_replicated(
            (dataset.train_images, dataset.train_labels.astype(np.int32)), mesh
        )

    def batches(self, step: int):
        del step  # every chunk reads the same arrays
        return self.data

    def select(self, state, data, i):
        del i  # the step's rows follow from state.step
        return gather_batch(
            state,
            data,
            steps_per_epoch=self.steps_per_epoch,
            batch=self.batch,
            batch_sharding=self.batch_sharding,
        )

    def position(self, step: int) -> dict:
        return _position("resident", step, self.num_examples, self.batch, self.seed)

    def close(self):
        pass


class ResidentEval:
    """An evaluation split, padded to whole batches (label −1) and replicated on the devices."""

    def __init__(self, images, labels, batch: int, mesh):
        self.batch_size = batch
        self.num_examples = len(labels)
        images = _pad_to_multiple(images, batch)
        labels = _pad_to_multiple(labels.astype(np.int32), batch, fill=-1)
        self.images, self.labels = parallel.put_replicated((images, labels), mesh)
        self.num_batches = self.images.shape[0] // batch

    def batches(self):
        for start in range(0, self.images.shape[0], self.batch_size):
            yield self.images, self.labels, np.int32(start)


def epoch_batch_indices(rng, epoch, num_examples: int, steps_per_epoch: int, batch_size: int):
    """The epoch's shuffled order from the run's root key, as (steps_per_epoch, batch) indices.

    The tail that does not fill a batch is dropped, as the official DataLoader(drop_last=True).
    """
    data_rng = jax.random.fold_in(jax.random.fold_in(rng, _DATA_STREAM), epoch)
    order = jax.random.permutation(data_rng, num_examples)
    return order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def gather_batch(state, data, *, steps_per_epoch: int, batch: int, batch_sharding=None):
    """The resident step's batch: rows of the on-device training set `data` = (images, labels)
    at this step's slot of its epoch's order (`epoch_batch_indices`); `state` is the train
    state (its `step` and root key `rng`)."""
    images, labels = data
    epoch = state.step // steps_per_epoch
    indices = epoch_batch_indices(state.rng, epoch, images.shape[0], steps_per_epoch, batch)[
        state.step % steps_per_epoch
    ]
    if batch_sharding is not None:
        indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    return images[indices], labels[indices]


def _pad_to_multiple(array: np.ndarray, multiple: int, fill=0) -> np.ndarray:
    extra = -len(array) % multiple
    if not extra:
        return array
    pad = np.full((extra, *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


def _position(order: str, step: int, num_examples: int, batch: int, seed: int) -> dict:
    """What the checkpoint records about the input stream at `step` (see StreamingTrain)."""
    steps_per_epoch = num_examples // batch
    return {
        "order": order,
        "next_step": int(step),
        "epoch": int(step // steps_per_epoch),
        "batch_in_epoch": int(step % steps_per_epoch),
        "num_examples": int(num_examples),
        "global_batch": int(batch),
        "seed": int(seed),
    }


# ----------------------------------------------------------------------------------------------
# Streaming.
# ----------------------------------------------------------------------------------------------


def _process_shard() -> streaming.Sharding:
    return streaming.Sharding(jax.process_index(), jax.process_count())


def _global_array(local: np.ndarray, sharding, global_batch: int):
    """This process's rows of a global batch → the global array, split over the data axis."""
    shape = (global_batch, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


class StreamingTrain:
    """This process's share of every global batch, decoded and cropped on the host.

    The stream is a pure function of the step (see `streaming`): the position in the checkpoint
    is the next step, and `batches(step)` (re)starts the stream there when it is not already
    there, which is all a resume needs. One step per dispatch: the host hands over one batch per
    step, and an ImageNet step is long enough that dispatching it alone costs nothing.
    """

    fuses_steps = False

    def __init__(self, config, split: streaming.Split, mesh, threads: int, seed=None):
        self.split = split
        self.batch = config.batch_size
        self.seed = config.seed if seed is None else seed
        self.crop_size = config.crop_size
        self.scale = (config.min_scale, config.max_scale)
        self.threads = threads
        self.shard = _process_shard()
        self.local_batch = self.shard.local(self.batch)
        self.steps_per_epoch = len(split) // self.batch
        self.end = config.max_epochs * self.steps_per_epoch  # no reading ahead past the run
        if config.max_steps > 0:
            self.end = min(self.end, config.max_steps)
        self.files = streaming.UnreadableFiles(split, config.max_unreadable_fraction)
        self.sharding = parallel.batch_sharded(mesh)
        self.stream = None
        self.next_step = None

    def _start(self, step: int):
        self.close()
        local = self.local_batch

        def example(k):
            step, j = divmod(k, local)
            return streaming.train_example(
                step,
                j,
                files=self.files,
                seed=self.seed,
                global_batch=self.batch,
                shard=self.shard,
                crop_size=self.crop_size,
                scale=self.scale,
            )

        start, stop = step * local, self.end * local
        batches = streaming.grain_batches(example, start, stop, local, self.threads)
        self.stream = streaming.Prefetcher(batches, self._to_device)
        self.next_step = step

    def _to_device(self, batch):
        step = int(batch["step"][0])
        if (step + 1) % self.steps_per_epoch == 0:  # the epoch's last batch: it is fully read
            self._report(step // self.steps_per_epoch)
        put = lambda key: _global_array(batch[key], self.sharding, self.batch)
        return step, ((put("view1"), put("view2")), put("label"))

    def _report(self, epoch: int):
        count = self.files.take_count(epoch)
        if count:
            log.warning(
                "process %d: %d unreadable images replaced in epoch %d (paths logged above)",
                self.shard.index,
                count,
                epoch,
            )

    def batches(self, step: int):
        if self.stream is None or self.next_step != step:
            self._start(step)
        batch_step, data = next(self.stream)
        assert batch_step == step, (batch_step, step)
        self.next_step = step + 1
        return data

    def select(self, state, data, i):
        del state, i  # one step per dispatch: `data` is its batch
        return data

    def position(self, step: int) -> dict:
        return _position("streaming", step, len(self.split), self.batch, self.seed)

    def close(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class StreamingEval:
    """A split streamed in order with the evaluation transform, padded with label −1 rows.

    Which examples this process reads is `streaming.eval_indices`: the same number of batches on
    every process, the real rows of all processes every example exactly once."""

    def __init__(self, split: streaming.Split, config, batch: int, mesh, threads: int):
        self.split = split
        self.batch_size = batch
        self.num_examples = len(split)
        self.shard = _process_shard()
        self.indices = streaming.eval_indices(len(split), batch, self.shard)
        self.num_batches = len(self.indices)
        self.crop_size = config.crop_size
        self.threads = threads
        self.files = streaming.UnreadableFiles(split, config.max_unreadable_fraction)
        self.sharding = parallel.batch_sharded(mesh)

    def batches(self):
        local = self.indices.shape[1]
        indices = self.indices.reshape(-1)

        def example(k):
            return streaming.eval_example(
                int(indices[k]), files=self.files, crop_size=self.crop_size
            )

        def to_device(batch):
            images = _global_array(batch["image"], self.sharding, self.batch_size)
            labels = _global_array(batch["label"], self.sharding, self.batch_size)
            return images, labels, np.int32(0)

        batches = streaming.grain_batches(example, 0, len(indices), local, self.threads)
        stream = streaming.Prefetcher(batches, to_device)
        try:
            yield from stream
        finally:
            stream.close()

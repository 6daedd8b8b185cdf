"""Streaming a prepared tfds dataset (ArrayRecord, read through its data source), offline.

The datasets are built at test time by tests/tiny_tfds.py in a fresh interpreter: this process
never registers their builders, so it finds them from their files, as it finds a user's prepared
imagenet2012. Any network access fails the tests.
"""

import glob
import math
import os
import threading

import numpy as np
import pytest
import tiny_tfds
from helpers import REPO, framework_config, run_python

from simco_jax import data, inputs, parallel, sources, streaming, writers

NAME = "tiny_wnids"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    run_python(["tests/tiny_tfds.py", "build", directory])
    return directory


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    tiny_tfds.forbid_network(monkeypatch.setattr)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never the user's ~/.cache


def _config(name=NAME, data_dir="", **overrides):
    settings = dict(dataset=name, data_dir=data_dir, input_mode="auto", input_threads=2)
    return framework_config("simco", **{**settings, "batch_size": 8, **overrides})


def _loaded(split):
    """Every example of a split as (pixels as bytes, shape, label), in index order."""
    out = []
    for i in range(len(split)):
        image, label = split.load(i)
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.dtype == np.uint8
        out.append((pixels.tobytes(), pixels.shape, label))
    return out


def _generated(name, split):
    return [(a.tobytes(), a.shape, label) for a, label in tiny_tfds.examples(name, split)]


# ---------------------------------------------------------------------------------------------
# Reading a split.
# ---------------------------------------------------------------------------------------------


def test_the_builders_are_not_registered_here():
    """What the other tests read is found from the files alone."""
    import tensorflow_datasets as tfds

    for name in tiny_tfds.DATASETS:
        with pytest.raises(tfds.core.registered.DatasetNotFoundError):
            tfds.builder_cls(name)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_tfds_split_decodes_every_record_to_the_generated_image_and_label(tfds_dir, split):
    source = streaming.tfds_split(NAME, split, tfds_dir)
    assert len(source) == tiny_tfds.DATASETS[NAME][1][split][1]
    assert source.name == f"{NAME}[{split}]" and source.describe(5) == f"{NAME}[{split}][5]"
    loaded = _loaded(source)
    # tfds stores the records in an order of its own (a hash of the keys): each record is one of
    # the generated examples, with its label and its stored size, and each example is stored once.
    assert sorted(loaded) == sorted(_generated(NAME, split))
    assert len({shape for _, shape, _ in loaded}) > 10  # sizes 20-60 px, all kept


@pytest.mark.parametrize(
    "name, eval_split", [(NAME, "validation"), ("tiny_wnids_test_only", "test")]
)
def test_auto_mode_streams_varying_sizes_and_evaluates_on_validation_else_test(
    tfds_dir, name, eval_split
):
    config = _config(name, tfds_dir)
    assert inputs.resolve_mode(config) == "streaming"  # images of varying size
    dataset_name, train, test, num_classes = inputs.open_splits(config)
    assert dataset_name == name and num_classes == len(tiny_tfds.WNIDS)
    assert test.name == f"{name}[{eval_split}]"
    assert sorted(_loaded(train)) == sorted(_generated(name, "train"))
    assert sorted(_loaded(test)) == sorted(_generated(name, eval_split))
    data_ = inputs.create(config, parallel.make_mesh())
    assert (data_.mode, data_.num_classes, data_.num_train) == ("streaming", 6, len(train))
    assert data_.test.num_examples == len(test)
    data_.close()


def test_streaming_a_tfds_dataset_never_imports_tensorflow(tfds_dir):
    script = (
        "import sys; from helpers import framework_config; from simco_jax import inputs; "
        f"config = framework_config('simco', dataset={NAME!r}, data_dir=sys.argv[1]); "
        "assert inputs.resolve_mode(config) == 'streaming'; "
        "splits = inputs.open_splits(config); splits[1].load(0); splits[2].load(0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
    )
    result = run_python(
        ["-c", script, tfds_dir], env_extra={"PYTHONPATH": os.path.join(REPO, "tests")}
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _launch_offline(workdir, tfds_dir, *overrides):
    """The smoke SimCo ImageNet config through launch.py, network refused, on the built dataset."""
    return run_python(
        [
            "tests/tiny_tfds.py",
            "offline",
            "launch.py",
            "--config=configs/simco_imagenet.py:smoke",
            f"--workdir={workdir}",
            f"--config.dataset={NAME}",
            f"--config.data_dir={tfds_dir}",
            "--config.batch_size=16",
            "--config.input_threads=2",
            *overrides,
        ]
    )


def test_simco_trains_end_to_end_through_launch_streaming_the_tfds_dataset(tfds_dir, tmp_path):
    """A fresh interpreter, offline, with nothing but --config.dataset and --config.data_dir."""
    workdir = tmp_path / "run"
    result = _launch_offline(workdir, tfds_dir)  # 48 images: 3 steps per epoch, 2 epochs
    output = result.stdout + result.stderr
    assert f"{NAME} (streaming): 48 train / 18 test images, 6 classes" in output
    records = writers.read_metrics(str(workdir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(map(math.isfinite, losses))
    assert records[-1]["step"] == 6
    assert 0 <= records[-1]["probe_top1"] <= 100 and "knn_top1" in records[-1]


@pytest.mark.parametrize("case", ["unregistered", "unprepared", "tfrecord"])
def test_an_unknown_unprepared_or_sequential_dataset_is_one_true_line(tfds_dir, tmp_path, case):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    name, data_dir, message = {
        # Not a tfds builder, and not in this data_dir (it is in tfds_dir).
        "unregistered": (NAME, empty, f"'{NAME}' is neither a tfds builder nor prepared in "),
        # A tfds builder never prepared here.
        "unprepared": ("imagenet2012", empty, "'imagenet2012' is not prepared in "),
        "tfrecord": ("tiny_wnids_tfrecord", tfds_dir, "as tfrecord, which tfds cannot read at"),
    }[case]
    with pytest.raises(data.DataError, match=message) as error:
        inputs.open_splits(_config(name, data_dir, input_mode="streaming"))
    text = str(error.value)
    assert "\n" not in text and "array_record" in text
    if case == "unregistered":
        assert not glob.glob(os.path.join(empty, NAME, "*", "dataset_info.json"))
    if case == "unprepared":  # the directory named holds no prepared dataset
        named = text.split("is not prepared in '")[1].split("'")[0]
        assert named.startswith(os.path.join(empty, "imagenet2012", ""))
        assert not os.path.exists(os.path.join(named, "dataset_info.json"))
    if case == "tfrecord":
        assert glob.glob(os.path.join(tfds_dir, name, "1.0.0", "*.tfrecord-*"))
        assert not glob.glob(os.path.join(tfds_dir, name, "1.0.0", "*.array_record-*"))
    if case == "unregistered":  # 'auto' cannot tell its size: the resident loader says the same
        with pytest.raises(data.DataError, match=f"{empty}' holds no {NAME}/<version>/"):
            inputs.create(_config(name, data_dir), parallel.make_mesh())


# ---------------------------------------------------------------------------------------------
# config.class_list on a tfds dataset.
# ---------------------------------------------------------------------------------------------

# Listed unsorted; their label ids (positions in WNIDS: 4, 1, 0) are in neither name order.
LISTED = ["n03000134", "n01440764", "n02085620"]


def _class_list(tmp_path, names, file="classes.txt"):
    path = tmp_path / file
    path.write_text("# a subset\n" + "\n".join(names) + "\n")
    return str(path)


def _count_label_reads(monkeypatch):
    reads = []
    read_labels = streaming.read_labels

    def counted(source, *args, **kwargs):
        reads.append(len(source))
        return read_labels(source, *args, **kwargs)

    monkeypatch.setattr(streaming, "read_labels", counted)
    return reads


def _selection_files(tfds_dir):
    return sorted(glob.glob(os.path.join(tfds_dir, NAME, "1.0.0", "*-classes-*.npy")))


def _remove_selection_files(tfds_dir, tmp_path):
    for path in _selection_files(tfds_dir) + glob.glob(str(tmp_path / "cache" / "**" / "*.npy")):
        os.remove(path)


def test_class_list_selects_the_listed_records_relabelled_in_sorted_name_order(
    tfds_dir, tmp_path, monkeypatch
):
    _remove_selection_files(tfds_dir, tmp_path)
    reads = _count_label_reads(monkeypatch)
    config = _config(NAME, tfds_dir, class_list=_class_list(tmp_path, LISTED))
    _, train, test, num_classes = inputs.open_splits(config)
    assert num_classes == 3
    new_label = {tiny_tfds.WNIDS.index(n): sorted(LISTED).index(n) for n in LISTED}
    for selected, split in ((train, "train"), (test, "validation")):
        # The i-th example is the i-th listed record in record order, relabelled.
        full = _loaded(streaming.tfds_split(NAME, split, tfds_dir))
        expected = [(p, s, new_label[label]) for p, s, label in full if label in new_label]
        assert _loaded(selected) == expected
        assert sorted({label for _, _, label in expected}) == [0, 1, 2]
        generated = [e for e in _generated(NAME, split) if e[2] in new_label]
        assert len(selected) == len(generated)
    # The scan read each split's labels once and left one cache file per split beside the data.
    assert reads == [48, 18]
    files = _selection_files(tfds_dir)
    assert [os.path.basename(f).split("-classes-")[0] for f in files] == [
        f"{NAME}-1.0.0-train",
        f"{NAME}-1.0.0-validation",
    ]
    assert all(os.stat(f).st_mode & 0o777 == 0o644 for f in files)  # readable by every user
    # Reopened: read from the cache, not rescanned; the same examples.
    _, train_again, test_again, _ = inputs.open_splits(config)
    assert reads == [48, 18]
    assert _loaded(train_again) == _loaded(train) and _loaded(test_again) == _loaded(test)
    # The same list in another order (and another file) is the same selection.
    config.class_list = _class_list(tmp_path, sorted(LISTED), "sorted.txt")
    inputs.open_splits(config)
    assert reads == [48, 18] and _selection_files(tfds_dir) == files
    # Without the cache: rescanned, and identical.
    _remove_selection_files(tfds_dir, tmp_path)
    _, train_fresh, _, _ = inputs.open_splits(config)
    assert reads == [48, 18, 48, 18] and _loaded(train_fresh) == _loaded(train)
    # The checkpoint's data fingerprint tells two lists of the same size apart.
    other = [n for n in tiny_tfds.WNIDS if n not in LISTED][:3]
    config.class_list = _class_list(tmp_path, other, "other.txt")
    other_train = inputs.open_splits(config)[1]
    assert inputs._split_identity(other_train) != inputs._split_identity(train_fresh)
    config.class_list = _class_list(tmp_path, sorted(LISTED), "sorted.txt")
    # The streamed order acts on positions in the selection: batch 0 is epoch 0's first positions.
    data_ = inputs.create(config, parallel.make_mesh())
    assert data_.num_classes == 3 and data_.num_train == len(train)
    (view1, _), labels = data_.train.batches(0)
    data_.close()
    order = streaming.epoch_order(config.seed, 0, len(train))[: config.batch_size]
    assert parallel.to_host(labels).tolist() == [train.load(int(i))[1] for i in order]
    assert view1.shape == (config.batch_size, config.crop_size, config.crop_size, 3)


def test_class_selection_falls_back_to_the_cache_dir_and_is_written_atomically(
    tfds_dir, tmp_path, monkeypatch
):
    _remove_selection_files(tfds_dir, tmp_path)
    reads = _count_label_reads(monkeypatch)
    config = _config(NAME, tfds_dir, class_list=_class_list(tmp_path, LISTED))
    reference = _loaded(inputs.open_splits(config)[1])
    name = os.path.basename(_selection_files(tfds_dir)[0])
    _remove_selection_files(tfds_dir, tmp_path)
    # The place beside the data is unusable (a directory where the file would go).
    blocked = os.path.join(tfds_dir, NAME, "1.0.0", name)
    os.makedirs(blocked)
    try:
        # Several processes' worth of threads select at once: one valid file, no temporary left.
        results, errors = [], []

        def select():
            try:
                split = streaming.tfds_split(NAME, "train", tfds_dir, select=LISTED)
                results.append(_loaded(split))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=select) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and all(r == reference for r in results)
        cached = tmp_path / "cache" / "simco_jax" / "class_selections"
        assert sorted(os.listdir(cached)) == [name]
        assert not glob.glob(os.path.join(tfds_dir, NAME, "1.0.0", ".tmp-*"))
        count = len(reads)
        assert _loaded(streaming.tfds_split(NAME, "train", tfds_dir, select=LISTED)) == reference
        assert len(reads) == count  # read from the fallback cache
    finally:
        os.rmdir(blocked)


def test_a_listed_class_the_tfds_dataset_lacks_is_named(tfds_dir, tmp_path):
    config = _config(NAME, tfds_dir, class_list=_class_list(tmp_path, [*LISTED, "n09999999"]))
    with pytest.raises(data.DataError, match=r"lacks 1 of the 4 classes .*'n09999999'"):
        inputs.open_splits(config)


def test_class_list_is_refused_for_resident_data(tmp_path):
    config = framework_config("simco", class_list=_class_list(tmp_path, LISTED))
    with pytest.raises(
        data.DataError, match="'synthetic' is loaded resident here, and config.class_list"
    ):
        inputs.create(config, parallel.make_mesh())
    config.input_mode = "streaming"
    with pytest.raises(data.DataError, match="'synthetic' has no class names"):
        inputs.create(config, parallel.make_mesh())


def test_a_small_fixed_size_dataset_in_array_record_files_is_loaded_resident(tfds_dir):
    """tfds's `as_dataset` cannot read ArrayRecord files: the resident loader reads them through
    the data source."""
    config = _config("tiny_fixed", tfds_dir)
    assert inputs.resolve_mode(config) == "resident"
    dataset = sources.load_dataset(config)
    for images, labels, split in (
        (dataset.train_images, dataset.train_labels, "train"),
        (dataset.test_images, dataset.test_labels, "test"),
    ):
        assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
        loaded = [
            (a.tobytes(), a.shape, int(label)) for a, label in zip(images, labels, strict=True)
        ]
        assert sorted(loaded) == sorted(_generated("tiny_fixed", split))
    assert dataset.num_classes == len(tiny_tfds.WNIDS)


def test_imagenet100_on_tfds_labels_each_image_as_its_image_folder_does(tfds_dir, tmp_path):
    """configs/*_imagenet.py:imagenet100 on a dataset named like imagenet2012 (ImageNet-100's
    WordNet IDs among others) and on an image folder of the same images: the same 100 classes
    and the same label for every image."""
    import importlib

    from PIL import Image

    def imagenet100(**overrides):
        config = importlib.import_module("configs.simco_imagenet").get_config("imagenet100,smoke")
        config.update(overrides)
        return config

    name, names = "tiny_imagenet100", tiny_tfds.IN100_NAMES
    for split, folder in (("train", "train"), ("validation", "val")):
        for i, (pixels, label) in enumerate(tiny_tfds.examples(name, split)):
            os.makedirs(tmp_path / folder / names[label], exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / folder / names[label] / f"{i}.png")
    _, train, test, num_classes = inputs.open_splits(imagenet100(dataset=name, data_dir=tfds_dir))
    folder_splits = inputs.open_splits(imagenet100(dataset="imagefolder", data_path=str(tmp_path)))
    assert num_classes == folder_splits[3] == 100
    for ours, theirs in ((train, folder_splits[1]), (test, folder_splits[2])):
        labels = {pixels: label for pixels, _, label in _loaded(ours)}
        assert labels == {pixels: label for pixels, _, label in _loaded(theirs)}
        assert sorted(labels.values()) == list(range(100))


# ---------------------------------------------------------------------------------------------
# config.eval_dataset: the test split from another tfds dataset (imagenet_v2 for imagenet2012).
# ---------------------------------------------------------------------------------------------

V2 = "tiny_wnids_v2"  # only a `test` split; some of tiny_wnids' class names, in another order


def _by_name(names, labels):
    """The training label of each of another dataset's label ids, by ClassLabel name."""
    return {i: labels.index(n) for i, n in enumerate(names) if n in labels}


def test_eval_dataset_is_the_other_datasets_test_split_labelled_by_class_name(tfds_dir):
    config = _config(NAME, tfds_dir, eval_dataset=V2)
    name, train, test, num_classes = inputs.open_splits(config)
    assert (name, num_classes, train.name, test.name) == (NAME, 6, f"{NAME}[train]", f"{V2}[test]")
    # Record by record: the other dataset's example, its label mapped by name.
    to_train = _by_name(tiny_tfds.V2_NAMES, tiny_tfds.WNIDS)
    raw = _loaded(streaming.tfds_split(V2, "test", tfds_dir))
    assert _loaded(test) == [(p, s, to_train[label]) for p, s, label in raw]
    assert sorted(_loaded(test)) == sorted(
        (p, s, to_train[lb]) for p, s, lb in _generated(V2, "test")
    )
    assert {label for *_, label in _loaded(test)} == {5, 1, 2, 0}  # not the ids 0-3 of V2_NAMES
    # The training split, the kNN bank and the checkpoint's data fingerprint are unchanged.
    assert _loaded(train) == _loaded(inputs.open_splits(_config(NAME, tfds_dir))[1])
    data_ = inputs.create(config, parallel.make_mesh())
    try:
        assert data_.test.num_examples == 14 and data_.test.split.name == f"{V2}[test]"
        assert data_.train_eval.split.name == f"{NAME}[train]" and data_.num_classes == 6
        assert data_.identity == inputs._split_identity(train)
    finally:
        data_.close()


def test_eval_dataset_with_class_list_keeps_the_listed_classes_in_sorted_name_order(
    tfds_dir, tmp_path
):
    config = _config(NAME, tfds_dir, class_list=_class_list(tmp_path, LISTED), eval_dataset=V2)
    _, train, test, num_classes = inputs.open_splits(config)
    assert num_classes == 3 and test.name.startswith(f"{V2}[test], the 3 classes")
    # LISTED[0] (n03000134) is no class of V2: its label 2 simply has no test records.
    to_train = _by_name(tiny_tfds.V2_NAMES, sorted(LISTED))
    raw = _loaded(streaming.tfds_split(V2, "test", tfds_dir))
    expected = [(p, s, to_train[label]) for p, s, label in raw if label in to_train]
    assert _loaded(test) == expected and {label for *_, label in expected} == {0, 1}
    config.eval_dataset = ""
    assert _loaded(train) == _loaded(inputs.open_splits(config)[1])


def test_the_evaluators_score_every_image_of_the_eval_dataset(tfds_dir):
    """The probe scores the 14 images of the eval dataset; the kNN monitor scores the same
    source (`evaluator.test`) against a bank of the 48 training images (scored in the slow test
    below: its compilation takes 20 s here)."""
    import jax

    from simco_jax import evaluate, train_step

    mesh = parallel.make_mesh()
    config = _config(NAME, tfds_dir, eval_dataset=V2)
    data_ = inputs.create(config, mesh)
    try:
        comps = train_step.build_components(config, data_.num_classes, steps_per_epoch=6)
        state = jax.jit(
            lambda: train_step.create_train_state(config, comps, data_.image_shape),
            out_shardings=parallel.replicated(mesh),
        )()
        evaluator = evaluate.FeatureBackend(config, comps.model, comps.probe, data_, mesh)
        probe = evaluator.probe_accuracy(state)
    finally:
        data_.close()
    assert probe["probe_examples"] == 14
    assert evaluator.train.num_examples == 48
    assert 0 <= probe["probe_top1"] <= probe["probe_top5"] <= 100


@pytest.mark.parametrize(
    "case", ["other_classes", "not_class_label", "unprepared", "tfrecord", "no_listed_class"]
)
def test_an_eval_dataset_that_cannot_evaluate_is_one_line(tfds_dir, tmp_path, case):
    eval_dataset, message, overrides = {
        "other_classes": ("tiny_imagenet100", "101 classes that the training dataset lacks", {}),
        "not_class_label": ("tiny_int_labels", "needs an 'image' and a ClassLabel 'label'", {}),
        "unprepared": ("imagenet_v2", "'imagenet_v2' is not prepared in ", {}),
        "tfrecord": ("tiny_wnids_tfrecord", "which tfds cannot read at random", {}),
        "no_listed_class": (
            V2,
            rf"{V2}\[test\], the 2 classes .* has no records of the classes of config.class_list",
            {"class_list": _class_list(tmp_path, ["n03000134", "n01443537"])},
        ),
    }[case]
    config = _config(NAME, tfds_dir, eval_dataset=eval_dataset, **overrides)
    with pytest.raises(data.DataError, match=message) as error:
        inputs.create(config, parallel.make_mesh())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("dataset", ["tiny_fixed", "synthetic", "imagefolder"])
def test_eval_dataset_is_refused_for_resident_or_non_tfds_data(tfds_dir, tmp_path, dataset):
    config = _config(dataset, tfds_dir, eval_dataset=V2, data_path=str(tmp_path))
    what = "is loaded resident" if dataset == "tiny_fixed" else "is not a tfds dataset"
    with pytest.raises(data.DataError, match=f"dataset='{dataset}' {what} here") as error:
        inputs.create(config, parallel.make_mesh())
    assert "\n" not in str(error.value) and "not supported" in str(error.value)


@pytest.mark.slow  # about 50 s: a training run through launch.py, two linear evaluations
def test_a_run_evaluates_on_the_eval_dataset_and_so_does_its_linear_evaluation(tfds_dir, tmp_path):
    """Training through launch.py with --config.eval_dataset: the probe and the kNN score the
    other dataset's 14 images; the offline linear evaluation follows the run's setting, or its
    own --config.eval_dataset ('' = the training dataset's validation split, 18 images)."""
    import importlib

    from simco_jax import linear_eval

    workdir = tmp_path / "run"
    result = _launch_offline(
        workdir, tfds_dir, f"--config.eval_dataset={V2}", "--config.max_epochs=1"
    )
    assert f"{NAME} (streaming): 48 train / 14 test images of {V2}, 6 classes" in (
        result.stdout + result.stderr
    )
    final = writers.read_metrics(str(workdir))[-1]
    assert final["step"] == 3 and final["probe_examples"] == final["knn_examples"] == 14
    config = importlib.import_module("configs.linear_eval").get_config("smoke")
    config.update(pretrained=str(workdir), mode="linear", linear_batch_size=16)
    for eval_dataset, dataset, examples in ((None, V2, 14), ("", NAME, 18)):
        config.eval_dataset = eval_dataset
        linear = linear_eval.evaluate_checkpoint(config, str(tmp_path / "eval"))["linear"]
        assert (linear["eval_dataset"], linear["eval_examples"]) == (dataset, examples)

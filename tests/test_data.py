"""Data loading: synthetic, npz and tfds sources, and the errors that say how to fix bad data.

No test touches a dataset host: tfds runs under `tfds.testing.mock_data`, on a tiny dataset built
locally, or with the reachability probe replaced.
"""

import os
import socket
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from helpers import (
    reference_config,
)

from simco_jax import config as config_lib
from simco_jax import data, sources, train


def make_config(**overrides):
    values = dict(
        dataset="synthetic",
        data_path="",
        data_dir="",
        tfds_download=True,
        synthetic_num_train=200,
        synthetic_num_test=100,
        synthetic_num_classes=10,
        synthetic_image_size=8,
        seed=0,
        batch_size=16,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


# ----------------------------------------------------------------------------------------------
# Synthetic.
# ----------------------------------------------------------------------------------------------


def test_synthetic_shapes_dtypes_and_class_coverage():
    ds = sources.load_dataset(
        make_config(
            synthetic_num_train=30,
            synthetic_num_test=20,
            synthetic_num_classes=7,
            synthetic_image_size=6,
        )
    )
    assert ds.name == "synthetic"
    assert ds.train_images.shape == (30, 6, 6, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (20, 6, 6, 3) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.shape == (30,) and ds.train_labels.dtype == np.int32
    assert ds.test_labels.shape == (20,) and ds.test_labels.dtype == np.int32
    assert ds.num_classes == 7 and ds.image_shape == (6, 6, 3)
    # Labels cycle through the classes: balanced to within one image per class.
    for labels, n in ((ds.train_labels, 30), (ds.test_labels, 20)):
        counts = np.bincount(labels, minlength=7)
        assert counts.sum() == n and counts.min() == n // 7 and counts.max() == -(-n // 7)


def test_synthetic_is_deterministic_in_the_seed():
    a, b = sources.load_dataset(make_config(seed=3)), sources.load_dataset(make_config(seed=3))
    c = sources.load_dataset(make_config(seed=4))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_images, c.train_images)
    assert not np.array_equal(a.train_labels, c.train_labels)
    # Train and test are different draws, not copies.
    assert not np.array_equal(a.train_images[:100], a.test_images)


def test_synthetic_is_learnable_by_a_nearest_class_mean_probe():
    ds = sources.load_dataset(make_config())
    x_train = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float64)
    x_test = ds.test_images.reshape(len(ds.test_images), -1).astype(np.float64)
    means = np.stack([x_train[ds.train_labels == k].mean(0) for k in range(ds.num_classes)])
    distances = ((x_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == ds.test_labels).mean()
    assert accuracy > 0.9  # chance is 0.1
    # ...and the images are not templates alone: the noise makes every image distinct.
    assert len(np.unique(x_train, axis=0)) == len(x_train)


def test_synthetic_runs_with_the_real_config_schema():
    config = config_lib.base_config()
    config.update(config_lib.smoke_overrides())
    ds = sources.load_dataset(config)
    assert ds.train_images.shape == (config.synthetic_num_train, 16, 16, 3)
    assert ds.num_classes == config.synthetic_num_classes


def test_synthetic_smaller_than_a_batch_is_rejected():
    with pytest.raises(data.DataError, match=r"fewer than one batch \(batch_size=64\)"):
        sources.load_dataset(make_config(synthetic_num_train=32, batch_size=64))


# ----------------------------------------------------------------------------------------------
# npz.
# ----------------------------------------------------------------------------------------------


def npz_arrays(num_train=12, num_test=6, size=5, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        train_images=rng.integers(0, 256, (num_train, size, size, 3), dtype=np.uint8),
        train_labels=np.arange(num_train) % num_classes,
        test_images=rng.integers(0, 256, (num_test, size, size, 3), dtype=np.uint8),
        test_labels=np.arange(num_test) % num_classes,
    )


def write_npz(tmp_path, name="arrays.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def load_npz(path, batch_size=4):
    return sources.load_dataset(make_config(dataset="npz", data_path=path, batch_size=batch_size))


def test_npz_round_trip_ignores_extra_keys(tmp_path):
    arrays = npz_arrays()
    arrays["train_labels"][3] = 6  # the largest label, in the train split only
    path = write_npz(tmp_path, "my_set.npz", **arrays, coarse_labels=np.zeros(12, np.int64))
    ds = load_npz(path)
    assert ds.name == "my_set"
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
    np.testing.assert_array_equal(ds.test_images, arrays["test_images"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == 7  # max label over both splits + 1


def test_npz_class_names_fix_the_class_count(tmp_path):
    names = np.array(["a", "b", "c", "d", "e", "f", "g", "h", "i"])
    ds = load_npz(write_npz(tmp_path, **npz_arrays(), class_names=names))
    assert ds.num_classes == 9  # labels only reach 3


@pytest.mark.parametrize("shape", [(12, 5, 5), (12, 5, 5, 1)])
def test_npz_grayscale_is_repeated_to_three_channels(tmp_path, shape):
    arrays = npz_arrays()
    gray_train = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 256
    arrays["train_images"] = gray_train.astype(np.uint8)
    arrays["test_images"] = arrays["train_images"][:6]
    ds = load_npz(write_npz(tmp_path, **arrays))
    assert ds.train_images.shape == (12, 5, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(ds.train_images[..., channel], gray_train.reshape(12, 5, 5))


def test_npz_missing_file(tmp_path):
    with pytest.raises(data.DataFileNotFoundError, match="does not exist.*--config.data_path"):
        load_npz(str(tmp_path / "nope.npz"))
    assert issubclass(data.DataFileNotFoundError, FileNotFoundError)
    assert issubclass(data.DataFileNotFoundError, ValueError)


def test_npz_empty_path():
    with pytest.raises(data.DataError, match=r"needs --config.data_path="):
        load_npz("")


def test_npz_directory(tmp_path):
    with pytest.raises(data.DataError, match="is a directory"):
        load_npz(str(tmp_path))


def test_npz_not_an_archive(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello, not a zip archive")
    with pytest.raises(
        data.DataError, match=r"is not an npz archive \(it is a file starting with b'hello,'\)"
    ):
        load_npz(str(text))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"is not an npz archive \(it is an empty file\)"):
        load_npz(str(tmp_path / "empty.npz"))
    if os.path.exists("/dev/zero"):  # endless zeros: never read to the end
        with pytest.raises(data.DataError, match="is not a regular file, so not an npz archive"):
            load_npz("/dev/zero")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(data.DataError, match=r"single array \(\.npy\).*np\.savez"):
        load_npz(str(single))


def test_npz_missing_keys_are_named(tmp_path):
    arrays = npz_arrays()
    del arrays["test_labels"], arrays["test_images"]
    path = write_npz(tmp_path, **arrays, x=np.zeros(2))
    with pytest.raises(data.DataError) as info:
        load_npz(path)
    message = str(info.value)
    assert "lacks the keys ['test_images', 'test_labels']" in message
    assert "it has ['train_images', 'train_labels', 'x']" in message


def _with(key, value):
    arrays = npz_arrays()
    arrays[key] = value
    return arrays


BAD_NPZ = {
    "float images": (
        _with("train_images", np.zeros((12, 5, 5, 3), np.float32)),
        r"train_images must be uint8.*got dtype float32.*\(x \* 255\)\.round\(\)\.astype",
    ),
    "int64 images": (
        _with("test_images", np.zeros((6, 5, 5, 3), np.int64)),
        r"test_images must be uint8.*np\.clip\(x, 0, 255\)\.astype\(np\.uint8\)",
    ),
    "channels first": (
        _with("train_images", np.zeros((12, 3, 5, 5), np.uint8)),
        r"shape \(12, 3, 5, 5\).*np\.transpose\(x, \(0, 2, 3, 1\)\)",
    ),
    "four channels": (
        _with("train_images", np.zeros((12, 5, 5, 4), np.uint8)),
        r"train_images has shape \(12, 5, 5, 4\); images must be \(N, H, W, 3\)",
    ),
    "one-hot labels": (
        _with("train_labels", np.eye(4, dtype=np.int64)[np.arange(12) % 4]),
        r"train_labels must be 1-D.*got shape \(12, 4\).*argmax",
    ),
    "float labels": (
        _with("test_labels", np.zeros(6, np.float32)),
        r"test_labels must be integers.*float32.*astype\(np\.int32\)",
    ),
    "label count": (
        _with("train_labels", np.zeros(11, np.int64)),
        r"train_labels has 11 entries but train_images has 12.*one label per image",
    ),
    "negative label": (
        _with("test_labels", np.array([0, 1, -1, 2, 3, 0])),
        r"test_labels contains -1; class indices must be non-negative",
    ),
    "empty test": (
        dict(
            npz_arrays(),
            test_images=np.zeros((0, 5, 5, 3), np.uint8),
            test_labels=np.zeros(0, np.int64),
        ),
        r"test split is empty",
    ),
    "fewer than a batch": (
        npz_arrays(num_train=3),
        r"3 training images are fewer than one batch \(batch_size=4\).*--config\.batch_size",
    ),
    "image sizes differ": (
        _with("test_images", np.zeros((6, 7, 7, 3), np.uint8)),
        r"train images are \(5, 5, 3\) but test images are \(7, 7, 3\)",
    ),
    "label beyond class_names": (
        dict(npz_arrays(), class_names=np.array(["a", "b", "c"])),
        r"train_labels contains 3 but there are only 3 classes.*class_names",
    ),
    "pickled class_names": (
        dict(npz_arrays(), class_names=np.array(["a", 1, None], dtype=object)),
        r"'class_names' cannot be read without pickle.*dtype=str",
    ),
    "empty train": (
        dict(
            npz_arrays(),
            train_images=np.zeros((0, 5, 5, 3), np.uint8),
            train_labels=np.zeros(0, np.int64),
        ),
        r"the training split is empty \(train_images holds no images\)",
    ),
    # A label far beyond the others: an id, not a class; inferring 2**40 + 1 classes hung.
    "label 2**40": (
        _with("train_labels", np.array([0, 1, 2, 3] * 2 + [2**40, 0, 1, 2])),
        r"the labels reach 1099511627776 but only 5 distinct values occur, so the class count "
        r"\(1099511627777\) is not inferred from them. Add class_names .* or num_classes",
    ),
    "label 200000": (
        _with("test_labels", np.array([0, 1, 2, 3, 200_000, 0])),
        r"the labels reach 200000 but only 5 distinct values occur",
    ),
    "num_classes too large": (
        dict(npz_arrays(), num_classes=np.int64(2**40)),
        r"declares 1099511627776 classes, more than the 1000000",
    ),
    "num_classes not a count": (
        dict(npz_arrays(), num_classes=np.array([4, 5])),
        r"num_classes must be one positive integer",
    ),
}


def test_npz_num_classes_key_allows_sparse_labels(tmp_path):
    arrays = _with("test_labels", np.array([0, 1, 2, 3, 199, 0]))
    ds = load_npz(write_npz(tmp_path, **arrays, num_classes=np.int64(200)))
    assert ds.num_classes == 200 and ds.test_labels.dtype == np.int32


def test_npz_member_declaring_an_enormous_shape_is_caught_before_reading(tmp_path):
    # A header declaring 2**40 x 3 float64 (24 TiB) over a few bytes: MemoryError before.
    import io
    import zipfile

    member = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (2**40, 3)}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(b"\0" * 64)
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in npz_arrays().items():
            if key != "train_images":
                buffer = io.BytesIO()
                np.save(buffer, value)
                archive.writestr(f"{key}.npy", buffer.getvalue())
        archive.writestr("train_images.npy", member.getvalue())
    pattern = (
        r"member 'train_images.npy' declares shape \(1099511627776, 3\) of float64 "
        r"\(26,388,279,066,624 bytes\) but holds only 64 bytes; the file is corrupt or truncated"
    )
    with pytest.raises(data.DataError, match=pattern):
        load_npz(str(path))


def test_label_casts_to_int32_are_exact():
    np.testing.assert_array_equal(data._exact_int32(np.array([0, 7], np.uint64), "x", "s"), [0, 7])
    with pytest.raises(data.DataError, match=r"s: train_labels do not fit in int32"):
        data._exact_int32(np.array([0, 2**40]), "train_labels", "s")


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_npz_bad_arrays_are_explained(tmp_path, case):
    arrays, pattern = BAD_NPZ[case]
    with pytest.raises(data.DataError, match=pattern):
        load_npz(write_npz(tmp_path, **arrays))


def test_validate_arrays_accepts_good_data():
    arrays = npz_arrays()
    data.validate_arrays(**arrays, num_classes=4, batch_size=12, source="test")
    with pytest.raises(data.DataError, match="only 3 classes"):
        data.validate_arrays(**arrays, num_classes=3, batch_size=12, source="test")


# ----------------------------------------------------------------------------------------------
# tfds.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def forbid_download(monkeypatch):
    """Fails the test if tfds starts a download."""

    def download_and_prepare(self, *args, **kwargs):
        raise AssertionError("download_and_prepare must not run")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_mock_data(monkeypatch, no_proxy, name, num_classes):
    probed = []
    monkeypatch.setattr(
        data, "any_host_reachable", lambda addresses: probed.append(addresses) or True
    )
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = sources.load_dataset(make_config(dataset=name, batch_size=4))
    # mock_data leaves is_prepared() False, so the download path ran (as a no-op) after the
    # probe, which was asked about the host in the builder's checksums file.
    assert probed == [[("www.cs.toronto.edu", 443)]]
    assert ds.name == name and ds.num_classes == num_classes
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (6, 32, 32, 3) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    for labels in (ds.train_labels, ds.test_labels):
        assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < num_classes


def test_tfds_unreachable_fails_fast_with_alternatives(monkeypatch, tmp_path, forbid_download):
    monkeypatch.setattr(data, "any_host_reachable", lambda addresses: False)
    with pytest.raises(data.DataError) as info:  # at once: forbid_download fails any attempt
        sources.load_dataset(make_config(dataset="cifar100", data_dir=str(tmp_path)))
    message = str(info.value)
    assert "'cifar100' is not prepared" in message and str(tmp_path) in message
    assert "www.cs.toronto.edu:443" in message
    assert "tfds build cifar100 --data_dir=DIR" in message
    assert "--config.dataset=npz --config.data_path=" in message
    assert "--config.dataset=synthetic" in message


def test_tfds_download_disabled_never_probes(monkeypatch, tmp_path, forbid_download):
    def probe(addresses):
        raise AssertionError("the reachability probe must not run")

    monkeypatch.setattr(data, "any_host_reachable", probe)
    config = make_config(dataset="svhn_cropped", data_dir=str(tmp_path), tfds_download=False)
    with pytest.raises(data.DataError, match="tfds_download=False forbids(.|\n)*tfds build"):
        sources.load_dataset(config)


def test_tfds_failed_download_is_explained(monkeypatch, tmp_path):
    def download_and_prepare(self, *args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    monkeypatch.setattr(data, "any_host_reachable", lambda addresses: True)
    with pytest.raises(data.DataError, match=r"ConnectionError: connection reset(.|\n)*synthetic"):
        sources.load_dataset(make_config(dataset="cifar10", data_dir=str(tmp_path)))


def test_tfds_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` raises ImportError
    with pytest.raises(data.DataError, match=r"tensorflow-datasets and TensorFlow, which are not "):
        sources.load_dataset(make_config(dataset="cifar100"))
    with pytest.raises(data.DataError, match=r'pip install -e "\.\[tfds\]"(.|\n)*dataset=npz'):
        sources.load_dataset(make_config(dataset="cifar100"))


def test_tfds_unknown_name():
    with pytest.raises(
        data.DataError,
        match=r"unknown dataset 'cifar1000'\. Did you mean "
        r"\['cifar100', 'cifar10'\]\?.*'synthetic', 'npz'",
    ):
        sources.load_dataset(make_config(dataset="cifar1000"))


def test_download_addresses(monkeypatch, no_proxy):
    urls = {
        "https://a.example/x.tar.gz": None,
        "https://a.example/y.tar.gz": None,
        "http://b.example/z.mat": None,
        "https://c.example:8443/w": None,
    }
    assert data.download_addresses(urls) == [
        ("a.example", 443),
        ("b.example", 80),
        ("c.example", 8443),
    ]
    assert data.download_addresses(None) == [("storage.googleapis.com", 443)]
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")
    assert data.download_addresses(urls) == [("proxy.local", 3128), ("b.example", 80)]


def test_any_host_reachable_on_local_sockets():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        open_port = server.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
            closed_port = closed.getsockname()[1]
            assert data.any_host_reachable([("127.0.0.1", closed_port)], timeout_s=1.0) is False
            assert data.any_host_reachable(
                [("127.0.0.1", closed_port), ("127.0.0.1", open_port)], timeout_s=1.0
            )


def test_any_host_reachable_gives_up_at_the_deadline(monkeypatch):
    def hanging_connection(address, timeout=None):
        time.sleep(600)  # a DNS lookup or SYN that never answers (a daemon thread: not waited for)
        raise OSError("too late")

    monkeypatch.setattr(data.socket, "create_connection", hanging_connection)
    start = time.monotonic()
    assert data.any_host_reachable([("slow.example", 443)], timeout_s=0.2) is False
    assert time.monotonic() - start < 300  # gave up at its deadline, not with the connection


class SimcoTestTinyImages(tfds.core.GeneratorBasedBuilder):
    """A real, locally built tfds dataset: image i is filled with value i and has label i % 5."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(os.path.dirname(__file__))  # tests/ is no package to infer it from
    SPLITS = {"train": 10, "test": 5}

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(4, 4, 3)),
                "label": tfds.features.ClassLabel(num_classes=5),
            }
        )
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        offsets = {"train": 0, "test": 100}
        return {s: self._generate_examples(n, offsets[s]) for s, n in self.SPLITS.items()}

    def _generate_examples(self, num_examples, offset):
        for i in range(offset, offset + num_examples):
            yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 5}


class SimcoTestTrainOnly(SimcoTestTinyImages):
    SPLITS = {"train": 10}


def test_tfds_prepared_dataset_loads_without_probing(monkeypatch, tmp_path):
    tfds.builder("simco_test_tiny_images", data_dir=str(tmp_path)).download_and_prepare()

    def probe(addresses):
        raise AssertionError("a prepared dataset must not be probed for")

    monkeypatch.setattr(data, "any_host_reachable", probe)
    ds = sources.load_dataset(
        make_config(dataset="simco_test_tiny_images", data_dir=str(tmp_path), batch_size=10)
    )
    assert ds.num_classes == 5 and ds.train_images.shape == (10, 4, 4, 3)
    for images, labels, values in (
        (ds.train_images, ds.train_labels, range(10)),
        (ds.test_images, ds.test_labels, range(100, 105)),
    ):
        pixel = images[:, 0, 0, 0].astype(np.int64)
        assert sorted(pixel) == list(values)  # every example once, in tfds' shuffled order
        np.testing.assert_array_equal(
            images, np.broadcast_to(pixel[:, None, None, None], images.shape)
        )
        np.testing.assert_array_equal(labels, pixel % 5)


def test_tfds_without_a_test_split(tmp_path):
    tfds.builder("simco_test_train_only", data_dir=str(tmp_path)).download_and_prepare()
    config = make_config(dataset="simco_test_train_only", data_dir=str(tmp_path), batch_size=2)
    with pytest.raises(data.DataError, match=r"has splits \['train'\].*--config\.dataset=npz"):
        sources.load_dataset(config)


def _write_npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = dict(
        train_images=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 5, 64),
        test_images=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 5, 16),
    )
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(test_labels=None), r"lacks the keys \['test_labels'\]"),
        (dict(train_images=np.zeros((64, 16, 16, 3), np.float32)), "must be uint8"),
        (dict(train_images=np.zeros((64, 3, 16, 16), np.uint8)), r"np.transpose\(x, \(0, 2, 3, 1"),
        (dict(class_names=np.array(["a", "b"])), r"labels must lie in \[0, 2\)"),
        (dict(train_labels=np.arange(64) - 1), "class indices must be non-negative"),
        (
            dict(train_images=np.zeros((20, 16, 16, 3), np.uint8), train_labels=np.zeros(20, int)),
            r"20 training images are fewer than one batch \(batch_size=32\)",
        ),
    ],
)
def test_bad_npz_fails_before_compiling(changes, message, tmp_path):
    path = tmp_path / "arrays.npz"
    _write_npz(path, **changes)
    workdir = tmp_path / "run"
    config = reference_config(dataset="npz", data_path=str(path))
    with pytest.raises(data.DataError, match=message):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").exists()  # failed before the state was built


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset="cifar1000"), r"unknown dataset 'cifar1000'. Did you mean"),
        (
            dict(dataset="cifar10", tfds_download=False),
            "tfds dataset 'cifar10' is not prepared .* forbids downloading it",
        ),
    ],
)
def test_unknown_or_unprepared_dataset(overrides, message, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = reference_config(data_dir=str(tmp_path / "tfds"), **overrides)
    with pytest.raises(data.DataError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))

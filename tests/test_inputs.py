"""The input seam: the table of data sources, and what the trainer reads through it."""

import ast
import os

import numpy as np
import pytest
from helpers import REPO, framework_config, run_python

from simco_jax import config as config_lib
from simco_jax import inputs, parallel, sources, streaming, train, writers

TOY_CLASSES, TOY_SIZE = 4, 16


def _toy_arrays(count: int, seed: int):
    """Images whose class is a colour, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % TOY_CLASSES
    base = np.stack([labels * 60, 255 - labels * 50, np.full(count, 128)], -1)[:, None, None]
    noise = rng.normal(0, 20, (count, TOY_SIZE, TOY_SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int32)


def _open_toy(config, select):
    """The whole of a new source: its splits, opened from `config`."""
    del select  # no class names
    opened.append(config.data_path)
    train_split = streaming.array_split("toy[train]", *_toy_arrays(96, config.seed))
    test_split = streaming.array_split("toy[test]", *_toy_arrays(32, config.seed + 1))
    return sources.Splits("toy", train_split, test_split, TOY_CLASSES)


opened = []


@pytest.fixture
def toy(monkeypatch):
    """One table entry plus its open function: the source is then usable everywhere."""
    opened.clear()
    source = sources.Source(open=_open_toy, data_path="NAME (any text: the toy reads none)")
    monkeypatch.setitem(sources.SOURCES, "toy", source)
    return "toy"


def _toy_config(**overrides):
    toy = dict(dataset="toy", data_path="here", crop_size=TOY_SIZE, input_threads=1)
    return framework_config("simco", **{**toy, **overrides})


def test_a_new_source_is_one_entry_and_trains_through_the_real_inputs(toy, tmp_path):
    config = _toy_config(max_steps=4, knn_every_epochs=1)
    assert inputs.resolve_mode(config) == "streaming"  # it cannot load: it streams
    data = inputs.create(config, parallel.make_mesh())
    try:
        assert (data.name, data.mode, data.num_train, data.num_classes) == (
            "toy",
            "streaming",
            96,
            4,
        )
        images, labels, _ = next(data.test.batches())
        np.testing.assert_array_equal(np.asarray(labels)[:32], _toy_arrays(32, config.seed + 1)[1])
        assert np.asarray(images).shape[1:] == (TOY_SIZE, TOY_SIZE, 3)
    finally:
        data.close()
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["step"] == 4 and opened == ["here", "here"]
    records = writers.read_metrics(str(tmp_path))
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert "knn_top1" in records[-1]


def test_the_config_asks_the_table_what_a_source_needs(toy):
    with pytest.raises(
        config_lib.ConfigError, match=r"dataset='toy' needs --config.data_path=NAME"
    ):
        config_lib.validate(_toy_config(data_path=""))
    with pytest.raises(config_lib.ConfigError, match=r"dataset='toy' streams from disk"):
        config_lib.validate(_toy_config(input_mode="resident"))
    with pytest.raises(Exception, match="class_list selects classes"):
        sources.open_splits(_toy_config(), select=["a"])  # it has no class names


def test_every_source_name_of_the_table_is_the_only_place_that_names_it():
    """No module but `sources` branches on a built-in source's name."""
    names = {n for n in sources.SOURCES}
    package = os.path.join(REPO, "simco_jax")
    for file in sorted(os.listdir(package)):
        if not file.endswith(".py") or file == "sources.py":
            continue
        tree = ast.parse(open(os.path.join(package, file)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                assert not constants & names, f"{file}:{node.lineno} compares with a source name"


def _imports(module_file: str) -> set[str]:
    tree = ast.parse(open(module_file).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "simco_jax":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("simco_jax."):
            found.add(node.module.split(".")[1])
    return found


def test_the_package_imports_form_no_cycle():
    """Lazy imports included: a module never imports one that (indirectly) imports it."""
    package = os.path.join(REPO, "simco_jax")
    graph = {
        f[:-3]: _imports(os.path.join(package, f)) for f in os.listdir(package) if f.endswith(".py")
    }

    def reaches(start, target, seen):
        for name in graph.get(start, ()):
            if name == target or (name not in seen and reaches(name, target, seen | {name})):
                return True
        return False

    assert not sorted(m for m in graph if reaches(m, m, {m}))
    assert "train_step" not in _imports(f"{package}/inputs.py")  # the input side is below it


# ---------------------------------------------------------------------------------------------
# The kNN monitor's bank: a fixed, seeded subset of the training set.
# ---------------------------------------------------------------------------------------------


def test_the_knn_bank_is_a_fixed_seeded_subset_of_the_configured_size():
    config = framework_config("simco", knn_bank_size=100)
    bank = inputs.knn_bank_indices(config, 1000)
    assert len(bank) == len(set(bank.tolist())) == 100 and list(bank) == sorted(bank)
    assert 0 <= bank.min() and bank.max() < 1000
    np.testing.assert_array_equal(bank, inputs.knn_bank_indices(config, 1000))  # every call
    # Every process draws it alone: a fresh interpreter draws the same rows.
    script = (
        "import sys; from helpers import framework_config; from simco_jax import inputs; "
        "print(inputs.knn_bank_indices(framework_config('simco', knn_bank_size=100), 1000)"
        ".tolist())"
    )
    result = run_python(["-c", script], env_extra={"PYTHONPATH": os.path.join(REPO, "tests")})
    assert ast.literal_eval(result.stdout.strip().splitlines()[-1]) == bank.tolist()
    other = inputs.knn_bank_indices(framework_config("simco", knn_bank_size=100, seed=16), 1000)
    assert not np.array_equal(bank, other)  # drawn from the seed
    for size in (0, 1000, 5000):  # 0 or not smaller than the set: the whole set
        assert inputs.knn_bank_indices(framework_config("simco", knn_bank_size=size), 1000) is None


def test_the_knn_bank_source_holds_the_subset_resident_and_streamed(toy):
    mesh = parallel.make_mesh()
    resident = inputs.create(framework_config("simco", knn_bank_size=40), mesh)
    bank = inputs.knn_bank_indices(framework_config("simco", knn_bank_size=40), 256)
    dataset = sources.load_dataset(framework_config("simco"))
    assert resident.knn_bank.num_examples == 40 and resident.train_eval.num_examples == 256
    np.testing.assert_array_equal(
        np.asarray(resident.knn_bank.labels)[:40], dataset.train_labels[bank]
    )
    streamed = inputs.create(_toy_config(knn_bank_size=40), mesh)
    try:
        assert streamed.knn_bank.num_examples == 40 and streamed.train_eval.num_examples == 96
        labels = np.concatenate([np.asarray(b[1]) for b in streamed.knn_bank.batches()])
        expected = _toy_arrays(96, 15)[1][
            inputs.knn_bank_indices(_toy_config(knn_bank_size=40), 96)
        ]
        np.testing.assert_array_equal(labels[:40], expected)
        assert (labels[40:] == -1).all()  # padding
    finally:
        streamed.close()

"""The kNN monitor with the feature bank sharded over the devices equals the direct computation.

Simulated devices need XLA_FLAGS before JAX starts, so the 8-device checks run in a subprocess:
this file doubles as their worker (`python tests/test_evaluate.py OUT.json`).
"""

import json
import os
import sys

import numpy as np

NUM_CLASSES = 5


def _bank(seed, batches, rows, dim, real_rows):
    """Random unit features in (batches, rows, dim), label -1 on the rows past `real_rows`."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(batches * rows, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    labels = rng.integers(0, NUM_CLASSES, batches * rows).astype(np.int32)
    labels[real_rows:] = -1
    return feats.reshape(batches, rows, dim), labels.reshape(batches, rows)


def _queries(seed, count, dim):
    q = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def _sharded_vs_direct(k, dtype="float32"):
    """(sharded scores, direct scores) on this process's devices, for one bank and k."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from simco_jax import evaluate, parallel

    mesh = parallel.make_mesh()
    # 3 batches of 16 rows: 2 rows per device on 8 devices (fewer than k), 41 real rows, so the
    # last devices hold only padding in the last batch.
    feats, labels = _bank(0, 3, 16, 8, 41)
    queries = _queries(1, 12, 8)
    bank_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
    bank = jax.device_put((feats.astype(dtype), labels), bank_sharding)
    sharded = jax.jit(
        lambda f, lab, q: evaluate.sharded_knn_scores(
            mesh, f, lab, q, k=k, temperature=0.1, num_classes=NUM_CLASSES
        ),
        out_shardings=parallel.replicated(mesh),
    )(*bank, queries)
    # The reference sees the same (possibly bfloat16-rounded) values, in float32.
    rounded = np.asarray(jnp.asarray(feats, dtype).astype(jnp.float32)).reshape(-1, 8)
    rounded_q = np.asarray(jnp.asarray(queries, dtype).astype(jnp.float32))
    direct = evaluate.knn_scores(
        rounded,
        labels.reshape(-1),
        rounded_q,
        k=min(k, labels.size),
        temperature=0.1,
        num_classes=NUM_CLASSES,
    )
    return np.asarray(sharded), np.asarray(direct)


def _evaluator_knn(eval_batch_size, bank_dtype="float32", bank_size=0, evaluations=1):
    """FeatureBackend.knn_accuracy of the smoke SimCo model at its initial state, and a NumPy
    computation of the same number from the model's features of the whole sets at once (of the
    bank's `bank_size` training images, `inputs.knn_bank_indices`, when it is set)."""
    import jax
    from helpers import framework_config

    from simco_jax import evaluate, inputs, parallel, sources, train_step

    config = framework_config(
        "simco",
        eval_batch_size=eval_batch_size,
        knn_k=10,
        knn_bank_dtype=bank_dtype,
        knn_bank_size=bank_size,
    )
    dataset = sources.load_dataset(config)
    comps = train_step.build_components(config, dataset.num_classes, 8)
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    mesh = parallel.make_mesh()
    evaluator = evaluate.FeatureBackend(
        config, comps.model, comps.probe, inputs.create(config, mesh), mesh
    )
    ours = [evaluator.knn_accuracy(state) for _ in range(evaluations)]
    assert all(again == ours[0] for again in ours)  # the same bank at every evaluation
    ours = ours[0]

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    from simco_jax import augment

    aug = augment.AugmentParams.from_config(config)

    def feats(images):
        f = np.asarray(comps.model.apply(variables, augment.normalize(images, aug), train=False)[0])
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    bank = inputs.knn_bank_indices(config, len(dataset.train_labels))
    bank = slice(None) if bank is None else bank
    train_f, train_labels = feats(dataset.train_images[bank]), dataset.train_labels[bank]
    test_f = feats(dataset.test_images)
    sim = test_f @ train_f.T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, : config.knn_k]
    votes = np.zeros((len(test_f), dataset.num_classes))
    for i, row in enumerate(nearest):
        np.add.at(votes[i], train_labels[row], np.exp(sim[i, row] / config.knn_temperature))
    ranked = np.argsort(-votes, axis=1, kind="stable")
    hits = ranked == dataset.test_labels[:, None]
    direct = {f"knn_top{k}": 100.0 * hits[:, :k].any(axis=1).mean() for k in (1, 5)}
    direct["knn_examples"] = len(test_f)  # every test image scored once, padding never
    return ours, direct, jax.device_count()


def _worker(out_path):
    results = {}
    for k in (3, 10, 200):
        sharded, direct = _sharded_vs_direct(k)
        results[f"k{k}"] = float(np.abs(sharded - direct).max() / np.abs(direct).max())
    sharded, direct = _sharded_vs_direct(10, "bfloat16")
    results["bf16"] = float(np.abs(sharded - direct).max() / np.abs(direct).max())
    ours, direct, devices = _evaluator_knn(eval_batch_size=60)
    results.update(evaluator=ours, numpy=direct, devices=devices)
    with open(out_path, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------------------------
# One device (this process)


def test_sharded_knn_equals_direct_on_one_device():
    for k in (3, 10, 200):  # 200 > the 48 bank rows: every real row votes
        sharded, direct = _sharded_vs_direct(k)
        assert np.abs(direct).max() > 1.0  # the votes are not all zero
        np.testing.assert_allclose(sharded, direct, rtol=1e-5, atol=1e-6)


def test_bfloat16_bank_equals_direct_on_the_rounded_features():
    sharded, direct = _sharded_vs_direct(10, "bfloat16")
    np.testing.assert_allclose(sharded, direct, rtol=1e-5, atol=1e-6)


def test_evaluator_knn_equals_numpy_on_whole_sets():
    # eval_batch_size 60 does not divide the 256 train / 64 test images: padded last batches.
    ours, direct, _ = _evaluator_knn(eval_batch_size=60)
    assert ours == direct


def test_the_monitors_bank_is_its_configured_subset_at_every_evaluation():
    """knn_bank_size: the kNN of the seeded subset (the NumPy side takes the same indices), the
    same at every evaluation; the subset's size and draw are tested in tests/test_inputs.py."""
    ours, direct, _ = _evaluator_knn(eval_batch_size=60, bank_size=100, evaluations=2)
    assert ours == direct
    assert ours != _evaluator_knn(eval_batch_size=60)[0]  # not the whole set's


# --------------------------------------------------------------------------------------------
# Eight simulated devices (a subprocess)


def test_sharded_knn_and_evaluator_on_eight_devices(tmp_path):
    from helpers import run_python

    out = tmp_path / "knn.json"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run_python(["tests/test_evaluate.py", str(out)], env_extra=env, timeout=1800)
    results = json.loads(out.read_text())
    assert results["devices"] == 8
    for key in ("k3", "k10", "k200", "bf16"):
        assert results[key] < 1e-5, (key, results[key])
    assert results["evaluator"] == results["numpy"]
    # The same numbers as on one device: the sharding changes nothing.
    assert results["evaluator"] == _evaluator_knn(eval_batch_size=60)[0]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(sys.argv[1])

"""Evaluation on clean (only normalised) images: the online probe's accuracy and a kNN monitor.

Top-1 of the online probe over the whole test set is what the official code reports (a linear
layer on stop-gradient features, trained alongside; Zhang et al., CVPR 2022). The kNN monitor is
the usual protocol of solo-learn and InstDisc (Wu et al. 2018): cosine similarity to the clean
training set, the k nearest vote with weights exp(sim / T).

At ImageNet scale the training-feature bank (1.28 M × 2048 float32 = 10 GB) cannot be replicated,
so it is sharded over the devices' data axis: each device scores the queries against its rows and
keeps its own top k, the per-device lists are all-gathered (k per device per query) and merged by
a final top k. The k nearest of all rows are among the union of the per-device k nearest, so this
equals the direct computation on one device (up to the order of the k-term vote sums).

The evaluator registry (as big_vision's `config.evals`): each entry of `config.evals` names a
`type` and a period; the trainer builds `evaluator_class(type)(context, entry)` once and calls its
`run(state, report) -> {metric: number}` when the period comes (`report(done, total)` drives the
progress display and may be ignored), writing `<entry name>_<metric>`. A type is a key of
`EVALUATORS` or the import path of a module that defines a class `Evaluator` with that
constructor and `run`: a new evaluator is one module plus one config entry, e.g.

    config.evals.feature_norm = dict(type="my_project.feature_norm", every_epochs=5)
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from simco_jax import augment, parallel

log = logging.getLogger(__name__)


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of rows whose label is among the top-k scores, for each k, and `examples`: the
    number of rows scored; label < 0 is padding, counted nowhere."""
    ranked = jnp.argsort(-scores, axis=-1)
    hits = ranked == labels[:, None]
    valid = labels >= 0
    counts = {f"top{k}": jnp.sum(jnp.any(hits[:, :k], axis=-1) & valid) for k in ks}
    return {**counts, "examples": jnp.sum(valid)}


def knn_scores(train_features, train_labels, query_features, *, k, temperature, num_classes):
    """Class votes of the k nearest training features (cosine), weighted by exp(sim / T).

    Features must be L2-normalised; training rows with label < 0 (padding) never vote.
    """
    similarity = query_features @ train_features.T
    similarity = jnp.where(train_labels[None, :] >= 0, similarity, -jnp.inf)
    top_sim, top_idx = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_sim / temperature)
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * weights[..., None]
    return votes.sum(axis=1)


def sharded_knn_scores(
    mesh, bank_features, bank_labels, query_features, *, k, temperature, num_classes
):
    """`knn_scores` with the bank's rows sharded over the mesh's data axis; for use under jit.

    bank_features: (..., rows, F) with rows sharded over `parallel.DATA_AXIS` (leading axes, e.g.
    the evaluation batches the bank was written in, are flattened with the rows); bank_labels: the
    matching (..., rows), label < 0 for padding; query_features: (Q, F), replicated. The bank may
    be bfloat16 (similarities still accumulate in float32). Returns replicated (Q, num_classes).
    """
    spec = PartitionSpec(*([None] * (bank_labels.ndim - 1)), parallel.DATA_AXIS)

    def local(feats, labels, queries):
        feats = feats.reshape(-1, feats.shape[-1])
        labels = labels.reshape(-1)
        similarity = jnp.einsum(
            "qf,nf->qn",
            queries.astype(feats.dtype),
            feats,
            preferred_element_type=jnp.float32,
        )
        similarity = jnp.where(labels[None, :] >= 0, similarity, -jnp.inf)
        top_sim, top_idx = jax.lax.top_k(similarity, min(k, labels.shape[0]))
        # (Q, devices · k_local): every device's candidates, the same on every device.
        top_sim = jax.lax.all_gather(top_sim, parallel.DATA_AXIS, axis=1, tiled=True)
        top_labels = jax.lax.all_gather(labels[top_idx], parallel.DATA_AXIS, axis=1, tiled=True)
        top_sim, merged = jax.lax.top_k(top_sim, min(k, top_sim.shape[1]))
        top_labels = jnp.take_along_axis(top_labels, merged, axis=1)
        weights = jnp.exp(top_sim / temperature)  # padding: exp(-inf) = 0, one_hot(-1) = 0
        return (jax.nn.one_hot(top_labels, num_classes) * weights[..., None]).sum(axis=1)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(*spec, None), spec, PartitionSpec()),
        out_specs=PartitionSpec(),
        # all_gather's result is the same on every device, but JAX does not infer it.
        check_vma=False,
    )(bank_features, bank_labels, query_features)


def _percent(totals: dict, num_examples: int) -> dict:
    """Hit counts summed over the batches → percent of the split; `examples` stays a count."""
    return {k: v if k == "examples" else 100.0 * v / num_examples for k, v in totals.items()}


def _no_report(done: int, total: int) -> None:
    """The default progress hook of the evaluations: nothing to show."""


class FeatureBackend:
    """What the evaluators share: the jitted feature, probe and kNN functions, built once per
    run over the evaluation sources of `inputs` (`data.test`, and `data.knn_bank` as the kNN's
    training bank: resident arrays or streams, padded with label −1). Not an evaluator itself
    (those are `EVALUATORS`)."""

    def __init__(self, config, model, probe, data, mesh):
        self.config, self.model, self.probe = config, model, probe
        self.num_classes = data.num_classes
        self.test, self.train = data.test, data.knn_bank
        self.batch = self.test.batch_size
        self.mesh = mesh
        aug = augment.AugmentParams.from_config(config)
        self.num_test = self.test.num_examples
        batch_sharding = (
            parallel.batch_sharded(mesh)
            if self.batch % mesh.size == 0
            else parallel.replicated(mesh)
        )
        replicated = parallel.replicated(mesh)

        def features(variables, images, start):
            """Clean features of rows [start, start + batch); one compilation per split size."""
            batch = jax.lax.dynamic_slice_in_dim(images, start, self.batch)
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            x = augment.normalize(batch, aug)
            if x.shape[1] != config.crop_size:
                x = jax.image.resize(
                    x, (x.shape[0], config.crop_size, config.crop_size, x.shape[-1]), "bilinear"
                )
            feats, _ = model.apply(variables, x, train=False)
            return feats.astype(jnp.float32)

        def probe_counts(probe_params, feats, labels, start):
            logits = probe.apply({"params": probe_params}, feats)
            return topk_correct(logits, jax.lax.dynamic_slice_in_dim(labels, start, self.batch))

        # The kNN bank: (batches, rows, F), the rows of every batch sharded over the data axis
        # (padded to a multiple of the device count), so each device holds 1/devices of it.
        self.bank_dtype = jnp.dtype(config.get("knn_bank_dtype", "float32"))
        self.bank_rows = -(-self.batch // mesh.size) * mesh.size
        self._bank_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))

        def add_to_bank(bank, index, variables, images, labels, start):
            feats = features(variables, images, start)
            feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-12)
            rows = jax.lax.dynamic_slice_in_dim(labels, start, self.batch)
            pad = self.bank_rows - self.batch
            feats = jnp.pad(feats, ((0, pad), (0, 0))).astype(self.bank_dtype)
            rows = jnp.pad(rows, (0, pad), constant_values=-1)
            put = lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, index, 0)
            return put(bank[0], feats), put(bank[1], rows)

        def knn_counts(bank_feats, bank_labels, test_feats, test_labels, start):
            query = test_feats / jnp.linalg.norm(test_feats, axis=-1, keepdims=True).clip(1e-12)
            scores = sharded_knn_scores(
                mesh,
                bank_feats,
                bank_labels,
                query,
                k=min(config.knn_k, bank_labels.size),
                temperature=config.knn_temperature,
                num_classes=self.num_classes,
            )
            return topk_correct(
                scores, jax.lax.dynamic_slice_in_dim(test_labels, start, self.batch)
            )

        self._features = jax.jit(features, out_shardings=replicated)
        self._probe_counts = jax.jit(probe_counts, out_shardings=replicated)
        self._add_to_bank = jax.jit(
            add_to_bank, out_shardings=self._bank_sharding, donate_argnums=0
        )
        self._knn_counts = jax.jit(knn_counts, out_shardings=replicated)
        self._knn_compiled = None  # compiled at the first kNN evaluation, memory logged then

    def probe_accuracy(self, state, report=_no_report) -> dict:
        """{'probe_top1', 'probe_top5'}: the online probe on the test set, in %, and
        'probe_examples': how many test images it scored."""
        return {f"probe_{k}": v for k, v in self.probe_topk(state, report).items()}

    def knn_accuracy(self, state, report=_no_report) -> dict:
        """{'knn_top1', 'knn_top5'}: the kNN monitor on the test set, in %, and 'knn_examples':
        how many test images it scored."""
        return {f"knn_{k}": v for k, v in self.knn_topk(state, report).items()}

    def features(self, state, source) -> jax.Array:
        """Clean features of an evaluation source (`self.test`, `self.train`), padding rows
        included, replicated."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return jnp.concatenate(
            [self._features(variables, images, start) for images, _, start in source.batches()]
        )

    def probe_topk(self, state, report=_no_report) -> dict:
        """Online-probe top-1/top-5 in percent and the number of test images scored (padding
        excluded: the test set's size unless rows went missing or were read twice);
        `report(done, total)` follows the batches."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        report(0, self.test.num_batches)
        totals = {"top1": 0, "top5": 0, "examples": 0}
        for done, (images, labels, start) in enumerate(self.test.batches(), 1):
            feats = self._features(variables, images, start)
            counts = parallel.to_host(self._probe_counts(state.probe_params, feats, labels, start))
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            report(done, self.test.num_batches)
        return _percent(totals, self.num_test)

    def _empty_bank(self, dim: int):
        shape = (self.train.num_batches, self.bank_rows)
        return jax.jit(
            lambda: (jnp.zeros((*shape, dim), self.bank_dtype), jnp.full(shape, -1, jnp.int32)),
            out_shardings=self._bank_sharding,
        )()

    def knn_bank(self, state, batch_done=lambda result: None):
        """The normalised clean features and labels of the training split, rows sharded."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        bank = None
        for index, (images, labels, start) in enumerate(self.train.batches()):
            if bank is None:  # sized from the first batch's features
                bank = self._empty_bank(
                    jax.eval_shape(self._features, variables, images, start).shape[-1]
                )
            bank = self._add_to_bank(bank, np.int32(index), variables, images, labels, start)
            batch_done(bank)
        return bank

    def knn_topk(self, state, report=_no_report) -> dict:
        """kNN top-1/top-5 in percent and the number of test images scored; `report(done,
        total)` follows the batches (the training set's feature bank, then the test set's
        features and scores)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        total = self.train.num_batches + self.test.num_batches
        done = 0
        report(done, total)

        def batch_done(result):
            nonlocal done
            if report is not _no_report:  # a live count needs the batch finished, not queued
                jax.block_until_ready(result)
            done += 1
            report(done, total)

        bank_feats, bank_labels = self.knn_bank(state, batch_done)
        totals = {"top1": 0, "top5": 0, "examples": 0}
        for images, labels, start in self.test.batches():
            test_feats = self._features(variables, images, start)
            args = (bank_feats, bank_labels, test_feats, labels, start)
            if self._knn_compiled is None:
                self._knn_compiled = self._knn_counts.lower(*args).compile()
                self._log_knn_memory(bank_feats, self._knn_compiled)
            counts = parallel.to_host(self._knn_compiled(*args))
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            batch_done(counts)
        return _percent(totals, self.num_test)

    def _log_knn_memory(self, bank_feats, compiled):
        """Logs the bank's bytes per device and the scoring step's compiled temporary memory."""
        if not parallel.is_main_process():
            return
        per_device = bank_feats.addressable_shards[0].data.nbytes
        stats = compiled.memory_analysis()
        temp = getattr(stats, "temp_size_in_bytes", None)
        log.info(
            "kNN bank: %d rows x %d %s, %.2f MiB per device over %d devices; scoring %d queries "
            "needs %s MiB of temporaries per device",
            bank_feats.shape[0] * bank_feats.shape[1],
            bank_feats.shape[2],
            self.bank_dtype.name,
            per_device / 2**20,
            self.mesh.size,
            self.batch,
            "?" if temp is None else f"{temp / 2**20:.2f}",
        )


# ---------------------------------------------------------------- the evaluator registry


class Context(NamedTuple):
    """What an evaluator is built from, once per run."""

    config: Any
    comps: Any  # train_step.Components: model, probe, method ...
    inputs: Any  # inputs.Inputs: the run's training input and evaluation sources
    mesh: Any
    data: FeatureBackend  # the evaluation sources and the jitted feature function


class ProbeEvaluator:
    """'probe': top-1/top-5 of the online linear probe on the whole test set."""

    def __init__(self, context: Context, entry):
        self.data = context.data

    def run(self, state, report=_no_report) -> dict:
        return self.data.probe_topk(state, report)


class KnnEvaluator:
    """'knn': top-1/top-5 of the cosine kNN monitor (k = config.knn_k, T = knn_temperature)."""

    def __init__(self, context: Context, entry):
        self.data = context.data

    def run(self, state, report=_no_report) -> dict:
        return self.data.knn_topk(state, report)


EVALUATORS = {"probe": ProbeEvaluator, "knn": KnnEvaluator}


def evaluator_class(kind: str):
    """A built-in evaluator's class, or `Evaluator` of the module importable as `kind`."""
    if kind in EVALUATORS:
        return EVALUATORS[kind]
    return importlib.import_module(kind).Evaluator


def make_evaluators(config, context: Context) -> dict:
    """{name: evaluator} for every entry of config.evals."""
    return {
        name: evaluator_class(entry.type)(context, entry) for name, entry in config.evals.items()
    }

"""Evaluation on clean (only normalised) images: the online probe's accuracy and a kNN monitor.

Top-1 of the online probe over the whole test set is what the official code reports (a linear
layer on stop-gradient features, trained alongside; Zhang et al., CVPR 2022). The
kNN monitor is the usual CIFAR protocol: cosine similarity to the clean training set, the k nearest
vote with weights exp(sim / T).

The evaluator registry (as big_vision's `config.evals`): each entry of `config.evals` names a
`type` and a period; the trainer builds `evaluator_class(type)(context, entry)` once and calls its
`run(state, report) -> {metric: float}` when the period comes (`report(done, total)` drives the
progress display and may be ignored), writing `<entry name>_<metric>`. A type is a key of
`EVALUATORS` or the import path of a module that defines a class `Evaluator` with that
constructor and `run`: a new evaluator is one module plus one config entry, e.g.

    config.evals.feature_norm = dict(type="my_project.feature_norm", every_epochs=5)
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import augment, parallel


def _pad_to_multiple(array: np.ndarray, multiple: int, fill=0) -> np.ndarray:
    extra = -len(array) % multiple
    if not extra:
        return array
    pad = np.full((extra, *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of rows whose label is among the top-k scores, for each k; label < 0 is padding."""
    ranked = jnp.argsort(-scores, axis=-1)
    hits = ranked == labels[:, None]
    valid = labels >= 0
    return {f"top{k}": jnp.sum(jnp.any(hits[:, :k], axis=-1) & valid) for k in ks}


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


def _no_report(done: int, total: int) -> None:
    """The default progress hook of the evaluations: nothing to show."""


class Evaluator:
    """Holds the evaluation data on the device and the jitted functions, built once per run."""

    def __init__(self, config, model, probe, dataset, mesh):
        self.config, self.model, self.probe = config, model, probe
        self.num_classes = dataset.num_classes
        self.batch = config.eval_batch_size
        self.mesh = mesh
        aug = augment.AugmentParams.from_config(config)
        # Padding rows carry label -1 and are never counted.
        self.test = self._to_device(dataset.test_images, dataset.test_labels)
        self.train = self._to_device(dataset.train_images, dataset.train_labels)
        self.num_test = len(dataset.test_labels)
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

        def knn_counts(train_feats, train_labels, test_feats, test_labels, start):
            query = jax.lax.dynamic_slice_in_dim(test_feats, start, self.batch)
            scores = knn_scores(
                train_feats,
                train_labels,
                query,
                k=min(config.knn_k, train_feats.shape[0]),
                temperature=config.knn_temperature,
                num_classes=self.num_classes,
            )
            return topk_correct(
                scores, jax.lax.dynamic_slice_in_dim(test_labels, start, self.batch)
            )

        self._features = jax.jit(features, out_shardings=replicated)
        self._probe_counts = jax.jit(probe_counts, out_shardings=replicated)
        self._knn_counts = jax.jit(knn_counts, out_shardings=replicated)

    def _to_device(self, images, labels):
        images = _pad_to_multiple(images, self.batch)
        labels = _pad_to_multiple(labels.astype(np.int32), self.batch, fill=-1)
        return parallel.put_replicated((images, labels), self.mesh)

    def _starts(self, images):
        return [np.int32(i) for i in range(0, images.shape[0], self.batch)]

    def probe_accuracy(self, state, report=_no_report) -> dict:
        """{'probe_top1', 'probe_top5'}: the online probe on the test set, in %."""
        return {f"probe_{k}": v for k, v in self.probe_topk(state, report).items()}

    def knn_accuracy(self, state, report=_no_report) -> dict:
        """{'knn_top1', 'knn_top5'}: the kNN monitor on the test set, in %."""
        return {f"knn_{k}": v for k, v in self.knn_topk(state, report).items()}

    def features(self, state, images) -> jax.Array:
        """Clean features of `images` (a padded device array of this evaluator), replicated."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return jnp.concatenate([self._features(variables, images, s) for s in self._starts(images)])

    def probe_topk(self, state, report=_no_report) -> dict:
        """Online-probe top-1/top-5 in percent; `report(done, total)` follows the batches."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        images, labels = self.test
        starts = self._starts(images)
        report(0, len(starts))
        totals = {"top1": 0, "top5": 0}
        for done, start in enumerate(starts, 1):
            feats = self._features(variables, images, start)
            counts = parallel.to_host(self._probe_counts(state.probe_params, feats, labels, start))
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            report(done, len(starts))
        return {k: 100.0 * v / self.num_test for k, v in totals.items()}

    def _normalized_features(self, variables, images, batch_done):
        batches = []
        for start in self._starts(images):
            batches.append(self._features(variables, images, start))
            batch_done(batches[-1])
        feats = jnp.concatenate(batches)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-12)

    def knn_topk(self, state, report=_no_report) -> dict:
        """kNN top-1/top-5 in percent; `report(done, total)` follows the batches (features of
        the training and test sets, then the scoring of the test set)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        test_starts = self._starts(self.test[0])
        total = len(self._starts(self.train[0])) + 2 * len(test_starts)
        done = 0
        report(done, total)

        def batch_done(result):
            nonlocal done
            if report is not _no_report:  # a live count needs the batch finished, not queued
                jax.block_until_ready(result)
            done += 1
            report(done, total)

        train_feats = self._normalized_features(variables, self.train[0], batch_done)
        test_feats = self._normalized_features(variables, self.test[0], batch_done)
        totals = {"top1": 0, "top5": 0}
        for start in test_starts:
            counts = parallel.to_host(
                self._knn_counts(train_feats, self.train[1], test_feats, self.test[1], start)
            )
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            batch_done(counts)
        return {k: 100.0 * v / self.num_test for k, v in totals.items()}


# ---------------------------------------------------------------- the evaluator registry


class Context(NamedTuple):
    """What an evaluator is built from, once per run."""

    config: Any
    comps: Any  # train_step.Components: model, probe, method ...
    dataset: Any  # data.Dataset (host arrays)
    mesh: Any
    data: Evaluator  # the test/train images on the device and the jitted feature function


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

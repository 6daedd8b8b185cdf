"""Evaluation on clean (only normalised) images: the online probe's accuracy and a kNN monitor.

Top-1 of the online probe over the whole test set is what the official code reports (a linear
layer on stop-gradient features, trained alongside; Zhang et al., CVPR 2022). The
kNN monitor is the usual CIFAR protocol: cosine similarity to the clean training set, the k nearest
vote with weights exp(sim / T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import augment, parallel


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
    """The jitted evaluation functions, built once per run, over the evaluation sources of
    `inputs` (`data.test`, `data.train_eval`: resident arrays or streams, padded with label −1)."""

    def __init__(self, config, model, probe, data, mesh):
        self.config, self.model, self.probe = config, model, probe
        self.num_classes = data.num_classes
        self.test, self.train = data.test, data.train_eval
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

    def probe_accuracy(self, state, report=_no_report) -> dict:
        """Online-probe top-1/top-5 in percent; `report(done, total)` follows the batches."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        report(0, self.test.num_batches)
        totals = {"top1": 0, "top5": 0}
        for done, (images, labels, start) in enumerate(self.test.batches(), 1):
            feats = self._features(variables, images, start)
            counts = parallel.to_host(self._probe_counts(state.probe_params, feats, labels, start))
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            report(done, self.test.num_batches)
        return {f"probe_{k}": 100.0 * v / self.num_test for k, v in totals.items()}

    def _normalized_features(self, variables, source, batch_done):
        """(L2-normalised features, labels) of a whole source, padding rows included."""
        feats, labels = [], []
        for images, batch_labels, start in source.batches():
            feats.append(self._features(variables, images, start))
            labels.append(jax.lax.dynamic_slice_in_dim(batch_labels, start, self.batch))
            batch_done(feats[-1])
        feats = jnp.concatenate(feats)
        norms = jnp.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-12)
        return feats / norms, jnp.concatenate(labels)

    def knn_accuracy(self, state, report=_no_report) -> dict:
        """kNN top-1/top-5 in percent; `report(done, total)` follows the batches (features of
        the training and test sets, then the scoring of the test set)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        total = self.train.num_batches + 2 * self.test.num_batches
        done = 0
        report(done, total)

        def batch_done(result):
            nonlocal done
            if report is not _no_report:  # a live count needs the batch finished, not queued
                jax.block_until_ready(result)
            done += 1
            report(done, total)

        train_feats, train_labels = self._normalized_features(variables, self.train, batch_done)
        test_feats, test_labels = self._normalized_features(variables, self.test, batch_done)
        totals = {"top1": 0, "top5": 0}
        for start in range(0, test_feats.shape[0], self.batch):
            start = np.int32(start)
            counts = self._knn_counts(train_feats, train_labels, test_feats, test_labels, start)
            counts = parallel.to_host(counts)
            totals = {k: totals[k] + int(counts[k]) for k in totals}
            batch_done(counts)
        return {f"knn_{k}": 100.0 * v / self.num_test for k, v in totals.items()}

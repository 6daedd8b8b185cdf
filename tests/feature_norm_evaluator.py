"""A user-defined evaluator, as a user would add one: this module plus one `config.evals` entry.

    config.evals.feature_norm = dict(type="feature_norm_evaluator", every_steps=1)

It reports the mean L2 norm of the clean test features (a collapse monitor), as
`feature_norm_mean`.
"""

import jax.numpy as jnp


class Evaluator:
    def __init__(self, context, entry):
        self.data = context.data  # the evaluation sources and their features

    def run(self, state, report) -> dict:  # report(done, total) could drive a progress bar
        features = self.data.features(state, self.data.test)[: self.data.num_test]
        return {"mean": float(jnp.mean(jnp.linalg.norm(features, axis=-1)))}

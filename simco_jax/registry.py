"""The names of the method seam's parts, without JAX: the config checks them before anything
heavy is imported, and the modules that implement them build their tables on these names
(tests/test_registry.py checks that each table holds exactly these).
"""

# Projection heads (`models.Projector`): 'mlp' (MoCo v2, SimCo), 'mlp_bn' (BYOL),
# 'mlp3_bn' (SimSiam).
PROJECTORS = ("mlp", "mlp_bn", "mlp3_bn")
# Losses (`methods.LOSSES`), and those that use no negatives (no queue, no negative groups).
LOSSES = ("contrastive", "normalized_mse", "negative_cosine")
NEGATIVE_FREE_LOSSES = ("normalized_mse", "negative_cosine")
# Encoder optimizers (`optimizers.make_optimizer`).
OPTIMIZERS = ("sgd", "lars")
# Built-in evaluators (`evaluate.EVALUATORS`); any other `evals` type is a module path.
EVALUATORS = ("probe", "knn")

"""The registry's names are exactly those the modules implement (the config checks the names)."""

from simco_jax import config as config_lib
from simco_jax import evaluate, methods, models, optimizers, registry


def test_each_registry_table_holds_exactly_the_registered_names():
    assert models.PROJECTORS == registry.PROJECTORS
    assert tuple(methods.LOSSES) == registry.LOSSES
    negative_free = tuple(k for k, v in methods.LOSSES.items() if not v.uses_negatives)
    assert negative_free == registry.NEGATIVE_FREE_LOSSES
    assert optimizers.OPTIMIZERS == registry.OPTIMIZERS
    assert tuple(evaluate.EVALUATORS) == registry.EVALUATORS


def test_the_config_offers_the_registered_names():
    choices = {key: config_lib.DOMAINS[key].text for key in ("projector", "loss", "optimizer")}
    assert choices == {
        "projector": f"one of {registry.PROJECTORS}",
        "loss": f"one of {registry.LOSSES}",
        "optimizer": f"one of {registry.OPTIMIZERS}",
    }

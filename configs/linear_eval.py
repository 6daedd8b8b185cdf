r"""Offline evaluation of a pretrained run: a linear classifier on frozen features, and a kNN.

    python launch.py --config=configs/linear_eval.py --config.pretrained=runs/simco \
        --workdir=runs/simco/linear

The protocol is solo-learn's linear evaluation for CIFAR: the backbone is frozen (BatchNorm in
inference mode), the classifier sees RandomResizedCrop(scale 0.08–1) + horizontal-flip views of the
training images, SGD with momentum 0.9, no weight decay, batch 256, 100 epochs, cosine schedule;
top-1/top-5 on the clean test set. The kNN is the training run's cosine monitor (k = 200, T = 0.1,
`evaluate.knn_scores`) on clean images. The data set is the pretrained run's (its config.json).
Results: linear_eval.json and knn_eval.json in --workdir and in PRETRAINED (unless PRETRAINED cannot
be written: then in --workdir only, said at the start).
The classifier trains in --workdir as a training run does: it holds the workdir's lock, checkpoints
every epoch (--config.checkpoint_every_steps), at the end and on SIGTERM or Ctrl-C, and the same
command resumes it. --workdir may be a subdirectory of PRETRAINED, never PRETRAINED itself, a
directory holding it, or one of its checkpoints/, configs/, tensorboard/.
A run that has not finished training is refused; --config.allow_unfinished=true evaluates its
latest checkpoint.
Options: --config.mode=linear|knn|both, --config.linear_epochs, --config.linear_lr,
--config.linear_schedule=cosine|step|constant, --config.eval_dataset=imagenet_v2 (the test set
from another tfds dataset, labels mapped by class name; '' = the pretraining dataset's own; unset =
the pretrained run's setting). Variant `:smoke`: a few steps, for tests.
"""

from simco_jax import config as config_lib
from simco_jax import linear_eval

VARIANTS = {  # a few steps, for tests
    "smoke": dict(
        linear_epochs=1, linear_batch_size=32, linear_max_steps=4, knn_k=10, eval_batch_size=64
    )
}


def get_config(arg=None):
    return config_lib.apply_variants(linear_eval.default_config(), arg, VARIANTS)

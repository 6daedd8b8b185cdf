r"""SimMoCo on ImageNet-1k: configs/imagenet.py with framework=simmoco (see there for the recipe).

    python launch.py --config=configs/simmoco_imagenet.py --workdir=runs/simmoco_imagenet \
        --config.data_dir=/path/to/tensorflow_datasets        # tfds imagenet2012, prepared

Variants as configs/imagenet.py's: `:imagenet100`, `:smoke`, `:imagenet100,smoke`.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "configs_imagenet", os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet.py")
)
_imagenet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_imagenet)


def get_config(arg=None):
    return _imagenet.get_config(arg, framework="simmoco")

"""
Shipped RetinaMask configs and the authors' trained models, with the API of
``detectron2.model_zoo``. Importing this registers the ``retinamask://`` path prefix with
detectron2's ``PathManager``, so that ``MODEL.WEIGHTS`` may name a zoo checkpoint.
"""

from .catalog import ORIGINAL_MODELS
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file, list_configs

__all__ = [
    "ORIGINAL_MODELS",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
]

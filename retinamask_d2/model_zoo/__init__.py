"""
Shipped RetinaMask configs and trained models (the authors' and registered ones), with the API
of ``detectron2.model_zoo``. Importing this registers the ``retinamask://`` path prefix with
detectron2's ``PathManager``, so that ``MODEL.WEIGHTS`` may name a zoo checkpoint.
"""

from .catalog import MODEL_ZOO_URL_ENV, ORIGINAL_MODELS
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file, list_configs
from .model_zoo import register_checkpoint

__all__ = [
    "MODEL_ZOO_URL_ENV",
    "ORIGINAL_MODELS",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "register_checkpoint",
]

"""
Shipped RetinaMask configs and their trained checkpoints, with the API of
``detectron2.model_zoo``. Importing this registers the ``retinamask://`` path prefix with
detectron2's ``PathManager``, so that ``MODEL.WEIGHTS`` may name a zoo checkpoint.
"""
from .catalog import (
    DOWNLOAD_TIMEOUT_ENV,
    MODEL_ZOO_URL_ENV,
    ORIGINAL_MODELS,
    ORIGINAL_URL_ENV,
    ModelZooCatalog,
)
from .model_zoo import (
    get,
    get_checkpoint_url,
    get_config,
    get_config_file,
    list_configs,
    register_checkpoint,
)

__all__ = [
    "DOWNLOAD_TIMEOUT_ENV",
    "MODEL_ZOO_URL_ENV",
    "ORIGINAL_MODELS",
    "ORIGINAL_URL_ENV",
    "ModelZooCatalog",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "register_checkpoint",
]

import os
from typing import Dict, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..config import get_retinamask_cfg
from .catalog import MODEL_ZOO_URL_ENV, ORIGINAL_MODELS, ModelZooCatalog, RetinaMaskHandler

__all__ = [
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "register_checkpoint",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)


def _config_dirs() -> List[str]:
    """
    Directories that hold the shipped configs, the first one winning. An installed wheel has
    them in the package (setup.py links or copies ``configs/`` there); a source checkout
    without that link has them only at the top level.
    """
    dirs = [os.path.join(_PACKAGE_DIR, "configs")]
    # The top level is only ours in a source checkout; in an installed wheel it is
    # site-packages, where some unrelated distribution may have put a "configs" folder.
    if os.path.isfile(os.path.join(_REPO_ROOT, "setup.py")):
        dirs.append(os.path.join(_REPO_ROOT, "configs"))
    return [d for d in dirs if os.path.isdir(d)]


def _shipped_configs() -> Dict[str, str]:
    """
    Returns:
        dict[str, str]: config name relative to ``configs/`` (with "/" separators) -> file.
    """
    configs = {}
    # Reversed so that the first directory, the package's own, overwrites the source tree's.
    for config_dir in reversed(_config_dirs()):
        for root, _, files in os.walk(config_dir, followlinks=True):
            for f in files:
                if f.endswith(".yaml"):
                    cfg_file = os.path.join(root, f)
                    name = os.path.relpath(cfg_file, config_dir).replace(os.sep, "/")
                    configs[name] = cfg_file
    return configs


def list_configs() -> List[str]:
    """
    Returns:
        list[str]: names of all shipped configs, relative to ``configs/``, sorted, e.g.
        ["Base-RetinaMask.yaml", ..., "synthetic/retinamask_synthetic.yaml"].
    """
    return sorted(_shipped_configs())


def get_config_file(config_path: str) -> str:
    """
    Returns path to a shipped config file.

    Args:
        config_path (str): config file name relative to retinamask_d2's "configs/" directory,
            e.g., "retinamask_R50.yaml" or "synthetic/retinamask_synthetic.yaml".

    Returns:
        str: the real path to the config file.
    """
    # Only listed names are looked up, so "../setup.py" cannot reach outside configs/.
    configs = _shipped_configs()
    if config_path not in configs:
        raise RuntimeError(
            "{!r} is not in the RetinaMask model zoo. Known configs: {}".format(
                config_path, ", ".join(sorted(configs)) if configs else "(none found)"
            )
        )
    return configs[config_path]


def register_checkpoint(config_path: str, path_in_zoo: str, sha256: str) -> str:
    """
    Add a trained checkpoint for a shipped config to the catalogue at run time, so that
    ``get_config(config_path, trained=True)`` and ``get(config_path, trained=True)`` use it.
    This is how a team that serves its own weights plugs them in:
    ::
        # the file is served at https://models.example.com/zoo/r50/model_final.pth
        os.environ["RETINAMASK_MODEL_ZOO_URL"] = "https://models.example.com/zoo"
        model_zoo.register_checkpoint(
            "retinamask_R50.yaml", "r50/model_final.pth", sha256="<output of sha256sum>"
        )
        model = model_zoo.get("retinamask_R50.yaml", trained=True)

    A later call for the same config replaces the entry.

    Args:
        config_path (str): a shipped config name, see :func:`get_config_file`.
        path_in_zoo (str): path of the checkpoint relative to ``$RETINAMASK_MODEL_ZOO_URL``.
        sha256 (str): hex SHA-256 of the checkpoint file; a download that does not match it
            is deleted and fails.

    Returns:
        str: the checkpoint URL, ``retinamask://<path_in_zoo>``.
    """
    get_config_file(config_path)  # fails early, listing the known names, on a typo
    return ModelZooCatalog.register(config_path, path_in_zoo, sha256).url


def get_checkpoint_url(config_path: str) -> str:
    """
    Returns the URL to the model trained using the given config.

    Args:
        config_path (str): config file name relative to retinamask_d2's "configs/" directory.

    Returns:
        str: a ``retinamask://`` URL, resolved against ``$RETINAMASK_MODEL_ZOO_URL`` when the
        checkpoint is loaded. For the authors' models (``original/*.yaml``), the URL of the
        converted checkpoint, which is downloaded and converted on first use.
    """
    get_config_file(config_path)
    if config_path in ORIGINAL_MODELS:
        return RetinaMaskHandler.PREFIX + config_path[: -len(".yaml")] + ".pth"
    checkpoint = ModelZooCatalog.query(config_path)
    if checkpoint is None:
        raise RuntimeError(
            "No trained weights are published for {name} yet. To use your own, set "
            "MODEL.WEIGHTS to a local file or URL, or serve the checkpoint under "
            "${env} and call retinamask_d2.model_zoo.register_checkpoint({name!r}, "
            "<path under ${env}>, <sha256>).".format(name=config_path, env=MODEL_ZOO_URL_ENV)
        )
    return checkpoint.url


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """
    Returns a config object for a model in the model zoo.

    Args:
        config_path (str): config file name relative to retinamask_d2's "configs/" directory.
        trained (bool): If True, will set ``MODEL.WEIGHTS`` to the trained model zoo weights
            (see :func:`get_checkpoint_url`). If False, the checkpoint named in the config
            file's ``MODEL.WEIGHTS`` is kept; it typically initializes the backbone from an
            ImageNet pre-trained model and leaves the other weights random.

    Returns:
        CfgNode: detectron2's default config with the RetinaMask keys added and the file
        merged.
    """
    cfg_file = get_config_file(config_path)
    cfg = get_retinamask_cfg(cfg_file)
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    Get a model specified by relative path under retinamask_d2's ``configs/`` directory.

    Args:
        config_path (str): config file name relative to retinamask_d2's "configs/" directory,
            e.g., "retinamask_R50.yaml".
        trained (bool): see :func:`get_config`.
        device (str or None): overwrite the device in config, if given. Defaults to "cpu"
            when CUDA is not available.

    Returns:
        nn.Module: a model with ``MODEL.WEIGHTS`` loaded, in eval mode.

    Example:
    ::
        from retinamask_d2 import model_zoo
        model = model_zoo.get("retinamask_R50.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    # Unlike detectron2.model_zoo.get: a zoo model is nearly always wanted for inference.
    return model.eval()

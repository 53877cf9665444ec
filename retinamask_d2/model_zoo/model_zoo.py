import hashlib
import logging
import os
import re
from typing import Dict, List, Optional

import torch
from iopath.common.file_io import file_lock, get_cache_dir

from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathHandler, PathManager

from ..checkpoint import AtomicDetectionCheckpointer, write_atomically
from ..config import InputError, get_retinamask_cfg
from ..original import OriginalCheckpointError, convert_original_file
from .catalog import CHECKPOINTS, DOWNLOAD_TIMEOUT_ENV, MODEL_ZOO_URL_ENV, ORIGINAL_MODELS
from .catalog import ORIGINAL_URL_ENV, PREFIX

logger = logging.getLogger(__name__)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)


def _shipped_configs() -> Dict[str, str]:
    """
    Returns:
        dict[str, str]: config name relative to ``configs/`` (with "/" separators) -> file.
        An installed wheel has the configs in the package (setup.py links them there); a
        source checkout without that link has them only at the top level, which is ours only
        when setup.py is beside it (in a wheel it is site-packages).
    """
    dirs = [os.path.join(_PACKAGE_DIR, "configs")]
    if os.path.isfile(os.path.join(_REPO_ROOT, "setup.py")):
        dirs.insert(0, os.path.join(_REPO_ROOT, "configs"))
    configs = {}
    for config_dir in dirs:  # the package's own, last, wins
        for root, _, files in os.walk(config_dir, followlinks=True):
            for f in files:
                if f.endswith(".yaml"):
                    name = os.path.relpath(os.path.join(root, f), config_dir)
                    configs[name.replace(os.sep, "/")] = os.path.join(root, f)
    return configs


def list_configs() -> List[str]:
    """
    Returns:
        list[str]: sorted names of the shipped configs, relative to ``configs/``.
    """
    return sorted(_shipped_configs())


def get_config_file(config_path: str) -> str:
    """
    Returns:
        str: the real path of a shipped config, named relative to retinamask_d2's
        ``configs/``, e.g. "retinamask_R50.yaml" or "synthetic/retinamask_synthetic.yaml".
    """
    # Only listed names are looked up, so "../setup.py" cannot reach outside configs/.
    configs = _shipped_configs()
    if config_path not in configs:
        raise RuntimeError(
            f"{config_path!r} is not in the RetinaMask model zoo. Known configs: "
            + (", ".join(sorted(configs)) or "(none found)")
        )
    return configs[config_path]


def register_checkpoint(config_path: str, path_in_zoo: str, sha256: str) -> str:
    """
    Make ``get(config_path, trained=True)`` load ``$RETINAMASK_MODEL_ZOO_URL/<path_in_zoo>``,
    whose hex SHA-256 is ``sha256`` (a download that does not match fails and is not kept).

    Returns:
        str: the checkpoint's name, ``retinamask://<path_in_zoo>``.
    """
    get_config_file(config_path)  # a typo fails here, listing the known names
    path = path_in_zoo.removeprefix(PREFIX).lstrip("/")
    if not re.fullmatch("[0-9a-f]{64}", sha256.lower()):
        raise InputError(f"sha256 {sha256!r} is not 64 hex digits. Pass the file's sha256sum.")
    if not path or path.startswith("original/"):
        raise InputError(
            f"{path_in_zoo!r} is empty or under original/, which holds the authors' models. "
            f"Pass the checkpoint's path under ${MODEL_ZOO_URL_ENV}."
        )
    CHECKPOINTS[config_path] = (path, sha256.lower())
    return PREFIX + path


def get_checkpoint_url(config_path: str) -> str:
    """
    Returns:
        str: the URL of the model trained with a shipped config: ``retinamask://<path>`` of its
        catalogued checkpoint, or for the authors' models (``original/*.yaml``)
        ``retinamask://original/<name>.pth``, their checkpoint converted on first use.
    """
    get_config_file(config_path)
    if config_path in CHECKPOINTS:
        return PREFIX + CHECKPOINTS[config_path][0]
    if config_path not in ORIGINAL_MODELS:
        raise RuntimeError(
            f"No trained weights are published for {config_path} yet. Set MODEL.WEIGHTS to "
            f"your checkpoint (a local file or URL), or serve it under ${MODEL_ZOO_URL_ENV} and "
            f"call model_zoo.register_checkpoint({config_path!r}, <path under it>, <sha256>)."
        )
    return PREFIX + config_path[: -len(".yaml")] + ".pth"


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """
    Returns:
        CfgNode: the shipped config ``config_path`` merged into detectron2's defaults with the
        RetinaMask keys; with ``trained``, MODEL.WEIGHTS is :func:`get_checkpoint_url`.
    """
    cfg = get_retinamask_cfg(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    Returns:
        nn.Module: the model of a shipped config with MODEL.WEIGHTS loaded, on ``device``
        (default: the config's, or "cpu" without CUDA), in eval mode (unlike
        ``detectron2.model_zoo.get``: a zoo model is nearly always wanted for inference).
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _sha256(f) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, local: str, what: str, fix: str, sha256=None, force=False) -> str:
    """
    Returns ``local``, downloading ``url`` there unless it is (and matches ``sha256``, if given)
    into a temporary file renamed over it once complete and verified. The caller locks ``local``.
    """
    if os.path.isfile(local) and not force:
        with open(local, "rb") as f:
            if sha256 is None or _sha256(f) == sha256:
                return local
    # gdown gets past Google Drive's confirmation page for large files and fails on a
    # connection cut short; its timeout applies to each request, not to the process.
    import gdown

    timeout = float(os.environ.get(DOWNLOAD_TIMEOUT_ENV, 60))

    def write(f):
        try:
            gdown.download(url, f, timeout=timeout)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else "no details"
            message = f"Could not download {what} from {url} ({type(e).__name__}: {reason})."
            raise OSError(f"{message} {fix}") from e
        f.seek(0)
        actual = _sha256(f) if sha256 else None
        if actual != sha256:
            raise InputError(
                f"Checksum mismatch for {what} from {url}: expected SHA-256 {sha256}, got "
                f"{actual}; the file was not kept. {fix}"
            )

    os.makedirs(os.path.dirname(local), exist_ok=True)
    write_atomically(local, "w+b", write)
    return local


def _get_served(name: str, force: bool = False) -> str:
    """The local copy of ``$RETINAMASK_MODEL_ZOO_URL/<name>``, checked if catalogued."""
    base = os.environ.get(MODEL_ZOO_URL_ENV)
    if not base:
        raise InputError(
            f"${MODEL_ZOO_URL_ENV} is not set, so {PREFIX}{name} has no server. Set it to the "
            "http(s) URL that serves your checkpoints, or set MODEL.WEIGHTS to a local file."
        )
    url = base.rstrip("/") + "/" + name
    sha256 = next((sha for path, sha in CHECKPOINTS.values() if path == name), None)
    local = os.path.join(get_cache_dir(), "retinamask_d2", name)
    fix = f"Check that ${MODEL_ZOO_URL_ENV} is right and serves {name}."
    with file_lock(local):
        return _fetch(url, local, PREFIX + name, fix, sha256, force)


def _get_original(name: str, force: bool = False) -> str:
    """
    Returns the local converted checkpoint of ``retinamask://<name>``, downloading the authors'
    file and converting it on first use (or with ``force``). A lock keeps concurrent processes
    from doing the work twice, and each file appears only once complete.
    """
    config_name = name[: -len(".pth")] + ".yaml"
    if config_name not in ORIGINAL_MODELS:
        known = ", ".join(PREFIX + k[: -len(".yaml")] + ".pth" for k in ORIGINAL_MODELS)
        raise RuntimeError(f"{PREFIX}{name} is not one of the authors' models: {known}")
    drive_id = ORIGINAL_MODELS[config_name].drive_id
    cache_dir = os.path.join(get_cache_dir(), "retinamask_d2")
    converted = os.path.join(cache_dir, name)
    downloaded = os.path.join(cache_dir, "original", "downloads", drive_id + ".pth")
    mirror = os.environ.get(ORIGINAL_URL_ENV)
    url = (mirror.rstrip("/") + "/" if mirror else "https://drive.google.com/uc?id=") + drive_id
    fix = f"Check the connection, or set ${ORIGINAL_URL_ENV} to a mirror serving <URL>/{drive_id}."
    with file_lock(converted):
        if os.path.isfile(converted) and not force:
            return converted
        _fetch(url, downloaded, "the authors' checkpoint", fix, force=force)
        try:
            convert_original_file(get_config(config_name), downloaded, converted)
        except OriginalCheckpointError as e:
            os.remove(downloaded)
            raise RuntimeError(
                f"The authors' checkpoint downloaded from {url} cannot be converted ({e}). It was "
                "removed from the cache; the next load downloads it again."
            ) from None
        logger.info(f"Converted the authors' checkpoint {url} into {converted}")
    return converted


class RetinaMaskHandler(PathHandler):
    """
    Resolves ``retinamask://original/<model>.pth`` to the authors' checkpoint, converted, and
    ``retinamask://<path>`` to ``$RETINAMASK_MODEL_ZOO_URL/<path>``, each downloaded once into
    iopath's cache directory (``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``).
    """

    PREFIX = PREFIX

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        self._check_kwargs(kwargs)
        name = path[len(PREFIX) :]
        return (_get_original if name.startswith("original/") else _get_served)(name, force)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(RetinaMaskHandler())

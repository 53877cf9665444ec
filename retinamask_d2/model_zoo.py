"""
Shipped RetinaMask configs and trained models (the authors' and registered ones), with the API
of ``detectron2.model_zoo``. Importing this registers the ``retinamask://`` path prefix with
detectron2's ``PathManager``, so that ``MODEL.WEIGHTS`` may name a zoo checkpoint.
"""

import glob
import hashlib
import logging
import os
import re
from collections import namedtuple
from typing import Dict, List, Optional, Tuple

import torch
from iopath.common.file_io import file_lock, get_cache_dir

from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathHandler, PathManager

from .checkpoint import AtomicDetectionCheckpointer, write_atomically
from .config import InputError, get_retinamask_cfg
from .original import OriginalCheckpointError, convert_original_file

logger = logging.getLogger(__name__)

# Read at each download, so that setting them after import takes effect.
# The server of registered checkpoints, as <URL>/<path in zoo>; no default, none are published.
MODEL_ZOO_URL_ENV = "RETINAMASK_MODEL_ZOO_URL"
# A mirror that serves the authors' checkpoints as <URL>/<Drive file id>; Google Drive if unset.
ORIGINAL_URL_ENV = "RETINAMASK_ORIGINAL_URL"
# Seconds each request of a download may wait on a silent server (default 60).
DOWNLOAD_TIMEOUT_ENV = "RETINAMASK_DOWNLOAD_TIMEOUT"

PREFIX = "retinamask://"

# config name -> (path of its checkpoint under $RETINAMASK_MODEL_ZOO_URL, its hex SHA-256), set
# by register_checkpoint; the checkpoint is retinamask://<path>.
CHECKPOINTS: Dict[str, Tuple[str, str]] = {}


# A model released by the authors (chengyangfu/retinamask README): its Google Drive file id, their
# COCO test-dev AP and inference times (seconds per image on an Nvidia 1080 Ti).
OriginalModel = namedtuple("OriginalModel", "drive_id box_ap mask_ap box_time mask_time")

# config name -> the authors' release; its checkpoint is retinamask://original/<name>.pth.
ORIGINAL_MODELS: Dict[str, OriginalModel] = {
    f"original/retinamask_{backbone}.yaml": OriginalModel(*release)
    for backbone, *release in [
        ("R50", "17QnkNoibgzRnnSeLDFo27LmgPUifFBxz", 39.4, 34.9, 0.124, 0.139),
        ("R101", "1Fl-TI1oDRVBFYI1h1mn7IiEOXwTIR3AC", 41.4, 36.6, 0.145, 0.160),
        ("R101_GN", "19MCU9Q0YXbIrc4fRSPRV53T_RSxiVqh0", 41.7, 36.7, 0.153, 0.164),
        ("X101_32x8d_GN", "1n-tcTUZ28s0uvDOB_gZmsFtxA8flGxKF", 42.6, 37.4, 0.231, 0.270),
    ]
}


def _shipped_configs() -> Dict[str, str]:
    """
    Returns:
        dict[str, str]: config name relative to ``configs/`` (with "/" separators) -> file.
        A wheel has the configs in the package (setup.py links them there); a source checkout
        may have them only at the top level, ours only when setup.py is beside it.
    """
    package = os.path.dirname(os.path.realpath(__file__))
    dirs = [os.path.join(package, "configs")]
    if os.path.isfile(os.path.join(os.path.dirname(package), "setup.py")):
        dirs.insert(0, os.path.join(os.path.dirname(package), "configs"))
    configs = {}
    for config_dir in dirs:  # the package's own, last, wins
        for f in glob.glob(os.path.join(glob.escape(config_dir), "**", "*.yaml"), recursive=True):
            configs[os.path.relpath(f, config_dir).replace(os.sep, "/")] = f
    return configs


def list_configs() -> List[str]:
    """Sorted names of the shipped configs, relative to ``configs/``."""
    return sorted(_shipped_configs())


def get_config_file(config_path: str) -> str:
    """
    The real path of a shipped config, named relative to ``configs/``, e.g.
    "retinamask_R50.yaml" or "synthetic/retinamask_synthetic.yaml".
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
    The URL of the model trained with a shipped config: ``retinamask://<path>`` if registered;
    for the authors' ``original/<name>.yaml``, ``retinamask://original/<name>.pth``.
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
    The shipped config ``config_path`` merged into detectron2's defaults with the RetinaMask
    keys; with ``trained``, MODEL.WEIGHTS is :func:`get_checkpoint_url`.
    """
    cfg = get_retinamask_cfg(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    The model of a shipped config with MODEL.WEIGHTS loaded, on ``device`` (default: the
    config's, or "cpu" without CUDA), in eval mode, unlike ``detectron2.model_zoo.get``.
    """
    cfg = get_config(config_path, trained)
    cfg.MODEL.DEVICE = device or (cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu")
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _sha256(f) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _cached(name: str) -> str:
    return os.path.join(get_cache_dir(), "retinamask_d2", name)


def _fetch(url: str, local: str, what: str, fix: str, sha256=None, force=False) -> str:
    """
    Returns ``local`` (locked by the caller), downloaded from ``url`` unless it is there (and
    matches ``sha256``, if given); a download appears there only once complete and verified.
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


def _get_served(name: str, force: bool) -> str:
    """The local copy of ``$RETINAMASK_MODEL_ZOO_URL/<name>``, checked against its SHA-256."""
    sha256 = next((sha for path, sha in CHECKPOINTS.values() if path == name), None)
    if sha256 is None:  # refused before any request: nothing is loaded unchecked
        raise InputError(
            f"{PREFIX}{name} is not registered, so it has no SHA-256 to check a download "
            f"against. Call model_zoo.register_checkpoint(<config name>, {name!r}, "
            "<sha256sum of the file>) first, or set MODEL.WEIGHTS to a local file."
        )
    base = os.environ.get(MODEL_ZOO_URL_ENV)
    if not base:
        raise InputError(
            f"${MODEL_ZOO_URL_ENV} is not set, so {PREFIX}{name} has no server. Set it to the "
            "http(s) URL that serves your checkpoints, or set MODEL.WEIGHTS to a local file."
        )
    fix = f"Check that ${MODEL_ZOO_URL_ENV} is right and serves {name}."
    local = _cached(name)
    with file_lock(local):
        return _fetch(f"{base.rstrip('/')}/{name}", local, PREFIX + name, fix, sha256, force)


def _get_original(name: str, force: bool) -> str:
    """
    The converted checkpoint of ``retinamask://<name>``: the authors' file, downloaded and
    converted on first use (or with ``force``) under a lock, so that processes do it once.
    """
    config_name = name[: -len(".pth")] + ".yaml"
    if config_name not in ORIGINAL_MODELS:
        known = ", ".join(PREFIX + k[: -len(".yaml")] + ".pth" for k in ORIGINAL_MODELS)
        raise RuntimeError(f"{PREFIX}{name} is not one of the authors' models: {known}")
    drive_id = ORIGINAL_MODELS[config_name].drive_id
    converted = _cached(name)
    mirror = os.environ.get(ORIGINAL_URL_ENV)
    url = (mirror.rstrip("/") + "/" if mirror else "https://drive.google.com/uc?id=") + drive_id
    fix = f"Check the connection, or set ${ORIGINAL_URL_ENV} to a mirror serving <URL>/{drive_id}."
    with file_lock(converted):
        if os.path.isfile(converted) and not force:
            return converted
        downloaded = _cached(f"original/downloads/{drive_id}.pth")
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

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        self._check_kwargs(kwargs)
        name = path[len(PREFIX) :]
        return (_get_original if name.startswith("original/") else _get_served)(name, force)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(RetinaMaskHandler())

"""
The catalogue of trained RetinaMask checkpoints and the ``retinamask://`` path prefix that
downloads them.

``retinamask://<path in zoo>`` resolves to ``$RETINAMASK_MODEL_ZOO_URL/<path in zoo>``, and is
fetched by detectron2's ``PathManager`` into iopath's
download cache (``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``). A path that the catalogue
knows is checked against its SHA-256 before it is used.
"""
import contextlib
import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Dict, Optional

from iopath.common.file_io import file_lock, get_cache_dir

from detectron2.utils.file_io import PathHandler, PathManager

__all__ = [
    "MODEL_ZOO_URL_ENV",
    "ORIGINAL_URL_ENV",
    "ORIGINAL_MODELS",
    "OriginalModel",
    "DOWNLOAD_TIMEOUT_ENV",
    "Checkpoint",
    "ModelZooCatalog",
    "RetinaMaskHandler",
    "model_zoo_url",
    "sha256sum",
]

logger = logging.getLogger(__name__)

# The server that holds the checkpoints. No public weights are published yet, so there is no
# default: a team serving its own sets this. Read each time a path is resolved, so that setting
# it after import (or in a test) takes effect.
MODEL_ZOO_URL_ENV = "RETINAMASK_MODEL_ZOO_URL"
# Seconds a download may wait on a silent server before it fails (default 60).
DOWNLOAD_TIMEOUT_ENV = "RETINAMASK_DOWNLOAD_TIMEOUT"

# Where the authors' released checkpoints are downloaded from: Google Drive by default; a mirror
# that serves them as <URL>/<Drive file id> when set.
ORIGINAL_URL_ENV = "RETINAMASK_ORIGINAL_URL"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def model_zoo_url() -> str:
    """
    Returns:
        str: the base URL that ``retinamask://`` paths are resolved against,
        ``$RETINAMASK_MODEL_ZOO_URL``, with a trailing slash.
    """
    base = os.environ.get(MODEL_ZOO_URL_ENV)
    if not base:
        raise RuntimeError(
            "${} is not set, so retinamask:// paths cannot be resolved. No public RetinaMask "
            "weights are published yet: set it to the HTTP(S) URL of a server that holds your "
            "checkpoints, or set MODEL.WEIGHTS to a local file.".format(MODEL_ZOO_URL_ENV)
        )
    return base.rstrip("/") + "/"


@contextlib.contextmanager
def _download_timeout():
    # iopath downloads with urllib, which waits forever on a server that accepts the connection
    # and never answers; the socket default timeout is the only knob it honours.
    timeout = float(os.environ.get(DOWNLOAD_TIMEOUT_ENV, 60))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def sha256sum(path: str, chunk_size: int = 1 << 20) -> str:
    """
    Returns:
        str: the hex SHA-256 of a local file, read in chunks so that a large checkpoint is
        never held in memory twice.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """
    A trained checkpoint in the zoo.

    Attributes:
        path (str): path relative to the model zoo URL, e.g. "retinamask_R50/model_final.pth".
        sha256 (str): hex SHA-256 of the file, checked after every download.
    """

    path: str
    sha256: str

    @property
    def url(self) -> str:
        return RetinaMaskHandler.PREFIX + self.path


class ModelZooCatalog:
    """
    Mapping from config names (relative to ``configs/``) to trained checkpoints.

    Only checkpoints that really exist are listed. None are published yet, so the built-in
    catalogue is empty; a team that serves its own weights adds them with
    :func:`retinamask_d2.model_zoo.register_checkpoint`.
    """

    # format: {config name} -> Checkpoint(path in zoo, sha256)
    CHECKPOINTS: Dict[str, Checkpoint] = {}

    @classmethod
    def register(cls, config_name: str, path: str, sha256: str) -> Checkpoint:
        """
        Add or replace the checkpoint of ``config_name``. The config name is not checked here;
        see :func:`retinamask_d2.model_zoo.register_checkpoint`.
        """
        path = path.lstrip("/")
        if path.startswith(RetinaMaskHandler.PREFIX):
            path = path[len(RetinaMaskHandler.PREFIX) :]
        if not path:
            raise ValueError("A checkpoint needs a path in the model zoo, got an empty one.")
        sha256 = sha256.lower()
        if not _SHA256_RE.match(sha256):
            raise ValueError(
                "sha256 must be 64 hex digits (as printed by `sha256sum`), got {!r}.".format(sha256)
            )
        checkpoint = Checkpoint(path=path, sha256=sha256)
        cls.CHECKPOINTS[config_name] = checkpoint
        return checkpoint

    @classmethod
    def unregister(cls, config_name: str) -> None:
        cls.CHECKPOINTS.pop(config_name, None)

    @classmethod
    def query(cls, config_name: str) -> Optional[Checkpoint]:
        return cls.CHECKPOINTS.get(config_name)

    @classmethod
    def expected_sha256(cls, path: str) -> Optional[str]:
        """
        Returns:
            str or None: the SHA-256 that the zoo path ``path`` must have, or None when no
            catalogued checkpoint lives there (such paths are downloaded unchecked, like
            ``detectron2://`` ones).
        """
        for checkpoint in cls.CHECKPOINTS.values():
            if checkpoint.path == path:
                return checkpoint.sha256
        return None


@dataclass(frozen=True)
class OriginalModel:
    """
    A model released by the authors (chengyangfu/retinamask README), with their COCO test-dev
    figures and inference times (seconds per image on an Nvidia 1080 Ti).
    """

    drive_id: str
    box_ap: float
    mask_ap: float
    box_time: float
    mask_time: float


# config name -> the authors' release; its checkpoint is retinamask://original/<name>.pth.
ORIGINAL_MODELS: Dict[str, OriginalModel] = {
    "original/retinamask_R50.yaml": OriginalModel(
        "17QnkNoibgzRnnSeLDFo27LmgPUifFBxz", 39.4, 34.9, 0.124, 0.139
    ),
    "original/retinamask_R101.yaml": OriginalModel(
        "1Fl-TI1oDRVBFYI1h1mn7IiEOXwTIR3AC", 41.4, 36.6, 0.145, 0.160
    ),
    "original/retinamask_R101_GN.yaml": OriginalModel(
        "19MCU9Q0YXbIrc4fRSPRV53T_RSxiVqh0", 41.7, 36.7, 0.153, 0.164
    ),
    "original/retinamask_X101_32x8d_GN.yaml": OriginalModel(
        "1n-tcTUZ28s0uvDOB_gZmsFtxA8flGxKF", 42.6, 37.4, 0.231, 0.270
    ),
}


def _get_original(name: str) -> str:
    """
    Returns the local converted checkpoint of ``retinamask://<name>``, downloading the
    authors' file and converting it on first use. Each file appears only once complete, and
    a lock keeps concurrent processes from doing the work twice.
    """
    from ..original import OriginalCheckpointError, convert_original_file
    from .model_zoo import get_config

    config_name = name[: -len(".pth")] + ".yaml"
    if config_name not in ORIGINAL_MODELS:
        raise RuntimeError(
            "retinamask://{} is not one of the authors' models: {}".format(
                name, ", ".join("original/{}.pth".format(k[9:-5]) for k in ORIGINAL_MODELS)
            )
        )
    drive_id = ORIGINAL_MODELS[config_name].drive_id
    cache_dir = os.path.join(get_cache_dir(), "retinamask_d2")
    converted = os.path.join(cache_dir, name)
    downloaded = os.path.join(cache_dir, "original", "downloads", drive_id + ".pth")
    with file_lock(converted):
        if os.path.isfile(converted):
            return converted
        base = os.environ.get(ORIGINAL_URL_ENV)
        url = base.rstrip("/") + "/" + drive_id if base else None
        source = url or "Google Drive file {}".format(drive_id)
        if not os.path.isfile(downloaded):
            _download_original(drive_id, url, downloaded)
        try:
            convert_original_file(get_config(config_name), downloaded, converted)
        except OriginalCheckpointError as e:
            os.remove(downloaded)
            raise RuntimeError(
                "The authors' checkpoint downloaded from {} cannot be converted ({}). It was "
                "removed from the cache; the next load downloads it again.".format(source, e)
            ) from None
        logger.info("Converted the authors' {} into {}".format(source, converted))
    return converted


def _download_original(drive_id: str, url: Optional[str], output: str) -> None:
    # gdown handles Google Drive's confirmation page for large files and publishes `output`
    # only once the whole file has arrived.
    import gdown

    os.makedirs(os.path.dirname(output), exist_ok=True)
    timeout = float(os.environ.get(DOWNLOAD_TIMEOUT_ENV, 60))
    try:
        if url is None:
            gdown.download(id=drive_id, output=output, quiet=False, timeout=timeout)
        else:
            gdown.download(url=url, output=output, quiet=False, timeout=timeout)
    except Exception as e:
        raise OSError(
            "Could not download the authors' checkpoint {} ({}: {}). Check the connection, or "
            "set ${} to a mirror that serves it as <URL>/{}.".format(
                url or "from Google Drive, file id " + drive_id,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                ORIGINAL_URL_ENV,
                drive_id,
            )
        ) from e


class RetinaMaskHandler(PathHandler):
    """
    Resolve paths like ``retinamask://retinamask_R50/model_final.pth`` against the model zoo
    URL, download them through detectron2's ``PathManager`` (which caches them) and verify
    catalogued ones.
    """

    PREFIX = "retinamask://"

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        name = path[len(self.PREFIX) :]
        if name.startswith("original/"):
            return _get_original(name)
        url = model_zoo_url() + name
        try:
            # kwargs such as cache_dir go to iopath's HTTPURLHandler, which validates them.
            with _download_timeout():
                local_path = PathManager.get_local_path(url, force=force, **kwargs)
        except OSError as e:
            # urllib's own message ("Connection refused") does not say what was being fetched.
            raise OSError(
                "Could not download {} from {}: {}. Set ${} to a server that holds it.".format(
                    path, url, e, MODEL_ZOO_URL_ENV
                )
            ) from e

        expected = ModelZooCatalog.expected_sha256(name)
        if expected is not None:
            # Checked on every resolution, not only right after a download, so that a cached
            # file truncated or replaced since then is caught too.
            actual = sha256sum(local_path)
            if actual != expected:
                # Left in the cache, the bad file would be returned by every later call
                # without a new download.
                os.remove(local_path)
                raise RuntimeError(
                    "Checksum mismatch for {} downloaded from {}: expected SHA-256 {}, got {}. "
                    "The file was removed from the cache {}.".format(
                        path, url, expected, actual, local_path
                    )
                )
        logger.info("Model zoo path {} resolved to {}".format(path, local_path))
        return local_path

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(RetinaMaskHandler())

"""
The trained models of the RetinaMask model zoo: the authors' four released models, and the
catalogue of checkpoints trained with this package, empty until some are published.
"""

from typing import Dict, NamedTuple, Tuple

# The server of the catalogued checkpoints, as <URL>/<path in zoo>. No default, since none are
# published; read at each download, so that setting it after import takes effect.
MODEL_ZOO_URL_ENV = "RETINAMASK_MODEL_ZOO_URL"

# A mirror that serves the authors' checkpoints as <URL>/<Drive file id>; Google Drive if unset.
ORIGINAL_URL_ENV = "RETINAMASK_ORIGINAL_URL"
# Seconds each request of a download may wait on a silent server (default 60).
DOWNLOAD_TIMEOUT_ENV = "RETINAMASK_DOWNLOAD_TIMEOUT"

PREFIX = "retinamask://"


# config name -> (path of its trained checkpoint under $RETINAMASK_MODEL_ZOO_URL, its hex
# SHA-256); the checkpoint is retinamask://<path>. Empty until weights are published.
CHECKPOINTS: Dict[str, Tuple[str, str]] = {}


class OriginalModel(NamedTuple):
    """
    A model released by the authors (chengyangfu/retinamask README), with their COCO test-dev
    AP and inference times (seconds per image on an Nvidia 1080 Ti).
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

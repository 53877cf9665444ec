import os
import random
import sys

import numpy as np
import pytest
import torch

# Tests run against the source tree, with or without `pip install -e .`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from retinamask_d2 import get_retinamask_cfg  # noqa: E402

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def load_config(name, *opts):
    """A shipped config with ``opts`` merged, on the CPU and without pretrained weights."""
    return get_retinamask_cfg(
        os.path.join(CONFIG_DIR, name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts]
    )


# A ResNet-18 variant of retinamask_R50.yaml with narrow FPN and heads: same code paths,
# a fraction of the compute. It trains with the self-adjusting loss of the final models (the 1x
# config of Table 3 has the fixed one), so that the tests cover its statistics.
SMALL_MODEL_OPTS = [
    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SelfAdjustingSmoothL1Loss",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.RETINANET.NUM_CLASSES", 3,
    "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 160,
]  # fmt: skip


@pytest.fixture
def small_cfg():
    return load_config("retinamask_R50.yaml", *SMALL_MODEL_OPTS)


@pytest.fixture(autouse=True)
def seeded():
    """
    Each test starts from the same random state, whatever ran before it: weights that
    build_model initializes, and any unseeded draw, are the same alone and in any order.
    Module-scoped fixtures are set up before this and seed what they draw themselves.
    """
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def dist_url(monkeypatch):
    """
    A ``tcp://`` rendezvous URL whose store this process serves, on the port the kernel gave it
    (bound to port 0), as torchrun's agent serves it: processes started from here connect to it
    as clients (TORCHELASTIC_USE_AGENT_STORE), so no port is found free, released and then bound
    by a process that another may have beaten to it.
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    yield f"tcp://127.0.0.1:{store.port}"
    del store

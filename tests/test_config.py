import glob
import os

import pytest

from detectron2.config import get_cfg

from conftest import CONFIG_DIR, load_config
from retinamask_d2 import add_retinamask_config

SHIPPED = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)


def test_defaults_are_the_papers():
    cfg = get_cfg()
    add_retinamask_config(cfg)
    r = cfg.MODEL.RETINAMASK
    assert r.ANCHOR_MATCHER.NAME == "BestMatchMatcher"
    assert r.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD == 0.0
    assert r.BOX_REG_LOSS.NAME == "SelfAdjustingSmoothL1Loss"
    assert (r.BOX_REG_LOSS.BETA, r.BOX_REG_LOSS.MOMENTUM) == (0.11, 0.9)
    assert (r.NUM_MASK_PROPOSALS_TRAIN, r.NUM_MASKS_TEST) == (100, 50)
    assert list(r.MASK_IN_FEATURES) == ["p3", "p4", "p5"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_merges(name):
    cfg = load_config(name)
    assert cfg.MODEL.META_ARCHITECTURE in ("RetinaMask", "RetinaNet")
    if cfg.MODEL.META_ARCHITECTURE == "RetinaMask":
        # Sec. 3.5 inference settings.
        assert cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.05
        assert cfg.MODEL.RETINANET.NMS_THRESH_TEST == 0.4
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 100


def test_misspelled_key_names_the_key(tmp_path):
    cfg = get_cfg()
    add_retinamask_config(cfg)
    # yacs reports a wrong key on the command line with an AssertionError naming it.
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.RETINAMASK.BOX_REG_LOSS.BTA"):
        cfg.merge_from_list(["MODEL.RETINAMASK.BOX_REG_LOSS.BTA", "0.2"])

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'_BASE_: "{os.path.join(CONFIG_DIR, "Base-RetinaMask.yaml")}"\n'
        "MODEL:\n  RETINAMASK:\n    NUM_MASK_PROPOSAL_TRAIN: 50\n"
    )
    cfg = get_cfg()
    add_retinamask_config(cfg)
    with pytest.raises(KeyError, match="MODEL.RETINAMASK.NUM_MASK_PROPOSAL_TRAIN"):
        cfg.merge_from_file(str(bad))


def test_shipped_configs_need_the_retinamask_keys():
    cfg = get_cfg()
    with pytest.raises(KeyError, match="RETINAMASK"):
        cfg.merge_from_file(os.path.join(CONFIG_DIR, "retinamask_R50.yaml"))

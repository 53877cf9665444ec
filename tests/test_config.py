import glob
import os

import pytest

from detectron2.config import get_cfg

from conftest import CONFIG_DIR, load_config
from retinamask_d2 import InputError, add_retinamask_config, get_retinamask_cfg
from retinamask_d2.config import CHOICES

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
    if cfg.MODEL.META_ARCHITECTURE != "RetinaNet":
        # Sec. 3.5 inference settings.
        assert cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.05
        assert cfg.MODEL.RETINANET.NMS_THRESH_TEST == 0.4
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 100


def test_misspelled_key_names_the_key_and_its_likely_spelling(tmp_path):
    with pytest.raises(InputError, match=r"MODEL.RETINAMASK.BOX_REG_LOSS.BTA does not exist\. "
                       r"Did you mean MODEL.RETINAMASK.BOX_REG_LOSS.BETA\?"):  # fmt: skip
        get_retinamask_cfg(None, ["MODEL.RETINAMASK.BOX_REG_LOSS.BTA", "0.2"])

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'_BASE_: "{os.path.join(CONFIG_DIR, "Base-RetinaMask.yaml")}"\n'
        "MODEL:\n  RETINAMASK:\n    NUM_MASK_PROPOSAL_TRAIN: 50\n"
    )
    with pytest.raises(InputError, match="Did you mean MODEL.RETINAMASK.NUM_MASK_PROPOSALS_TRAIN"):
        get_retinamask_cfg(str(bad))
    with pytest.raises(InputError, match=r"FOO does not exist\. Fix its spelling"):
        get_retinamask_cfg(None, ["FOO", "1"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_value_out_of_a_keys_choices_is_named_as_the_config_is_built(key):
    config = os.path.join(CONFIG_DIR, "retinamask_R50.yaml")
    with pytest.raises(InputError, match=f"{key} is 'authors'; set it to ") as error:
        get_retinamask_cfg(config, [key, "authors"])
    for value in CHOICES[key]:
        assert repr(value) in str(error.value)
        get_retinamask_cfg(config, [key, value])  # each value it names is taken


def test_reference_frozen_bn_needs_the_backbone_that_applies_it():
    with pytest.raises(InputError, match="FROZEN_BN 'reference' is applied by build_retinamask_"):
        get_retinamask_cfg(
            os.path.join(CONFIG_DIR, "synthetic", "retinamask_synthetic.yaml"),
            ["MODEL.RETINAMASK.FROZEN_BN", "reference"],
        )


def test_value_of_another_type_names_the_key_and_the_type():
    with pytest.raises(InputError, match="SOLVER.BASE_LR takes a value of type float, not int"):
        get_retinamask_cfg(None, ["SOLVER.BASE_LR", "1"])
    with pytest.raises(InputError, match="KEY VALUE pairs; one value is missing"):
        get_retinamask_cfg(None, ["MODEL.DEVICE"])


def test_shipped_configs_need_the_retinamask_keys():
    cfg = get_cfg()
    with pytest.raises(KeyError, match="RETINAMASK"):
        cfg.merge_from_file(os.path.join(CONFIG_DIR, "retinamask_R50.yaml"))


RETINAMASK_CONFIGS = [
    "retinamask_R50_1x.yaml",
    "retinamask_R50.yaml",
    "retinamask_R101.yaml",
    "retinamask_R101_GN.yaml",
    "retinamask_X101_32x8d_GN.yaml",
    "synthetic/retinamask_synthetic.yaml",
]
RETINANET_TWINS = ["retinanet_R50_1x.yaml", "synthetic/retinanet_synthetic.yaml"]


def test_retinamask_configs_train_in_the_reference_units():
    default = get_cfg()
    add_retinamask_config(default)
    assert default.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 1.0
    for name in RETINAMASK_CONFIGS:
        cfg = load_config(name)
        # The reference box coder's weights, and its box loss divided by 4 x #positives.
        assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0), name
        assert cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 0.25, name
        assert cfg.MODEL.RETINAMASK.BOX_REG_LOSS.BETA == 0.11, name
    for name in RETINANET_TWINS:
        cfg = load_config(name)
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
        assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (1.0, 1.0, 1.0, 1.0), name
        assert cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA == 0.11, name


def test_configs_follow_the_released_ones():
    # Train sizes, schedules at batch 16 and box loss of the authors' configs/retina/*.yaml.
    sizes_2x = (640, 800, 1000)
    sizes_x101 = (640, 672, 704, 736, 768, 800, 840, 880, 920, 960, 1000)
    expected = {
        "retinamask_R50_1x.yaml": ((800,), (60000, 80000), 90000, "SmoothL1Loss"),
        "retinamask_R50.yaml": (sizes_2x, (120000, 160000), 180000, "SelfAdjustingSmoothL1Loss"),
        "retinamask_R101.yaml": (sizes_2x, (120000, 160000), 180000, "SelfAdjustingSmoothL1Loss"),
        "retinamask_R101_GN.yaml": (
            sizes_2x, (120000, 160000), 180000, "SelfAdjustingSmoothL1Loss"
        ),
        "retinamask_X101_32x8d_GN.yaml": (
            sizes_x101, (120000, 160000), 180000, "SelfAdjustingSmoothL1Loss"
        ),
    }  # fmt: skip
    for name, (sizes, steps, max_iter, loss) in expected.items():
        cfg = load_config(name)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == sizes, name
        assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST) == (1333, 800), name
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.01), name
        assert (tuple(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER) == (steps, max_iter), name
        assert cfg.MODEL.RETINAMASK.BOX_REG_LOSS.NAME == loss, name
        # Best matching at 0: the reference's LOW_QUALITY_MATCHES True, LOW_QUALITY_THRESHOLD 0.
        assert cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.NAME == "BestMatchMatcher", name
        assert cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD == 0.0, name
        # The reference's training (docs/original_training_step.md).
        r = cfg.MODEL.RETINAMASK
        assert (r.ANCHOR_MATCHER.PROMOTED_MATCH, r.LOSS_CLS_NORMALIZER) == (
            "max_iou",
            "positives+images",
        ), name
        assert r.CLIP_BEFORE_NMS and r.INCLUSIVE_MASK_BOXES, name
        assert list(cfg.MODEL.PIXEL_MEAN) == [102.9801, 115.9465, 122.7717], name
        mask_head = cfg.MODEL.ROI_MASK_HEAD
        assert (mask_head.POOLER_TYPE, mask_head.POOLER_SAMPLING_RATIO) == ("ROIAlign", 2), name
        # The released GN models (MODEL.USE_GN) normalize FPN and the detection head only.
        assert cfg.MODEL.ROI_MASK_HEAD.NORM == "", name
        gn = name.endswith("_GN.yaml")
        assert (cfg.MODEL.FPN.NORM, cfg.MODEL.RETINANET.NORM) == (("GN",) * 2 if gn else ("",) * 2)


def test_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path):
    text = tmp_path / "notes.yaml"
    text.write_text("just some notes, not a config\n")
    with pytest.raises(InputError, match="not a YAML mapping.*configs/retinamask_R50.yaml"):
        get_retinamask_cfg(str(text))
    with pytest.raises(InputError, match="does not exist"):
        get_retinamask_cfg(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        get_retinamask_cfg(str(broken))


def test_one_function_builds_every_config():
    cfg = get_retinamask_cfg(
        os.path.join(CONFIG_DIR, "retinamask_R50.yaml"), ["MODEL.RETINAMASK.NUM_MASKS_TEST", "7"]
    )
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaMask"
    assert cfg.MODEL.RETINAMASK.NUM_MASKS_TEST == 7
    assert get_retinamask_cfg().MODEL.RETINAMASK.NUM_MASKS_TEST == 50

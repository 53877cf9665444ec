import difflib
import os
import re

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


class InputError(ValueError):
    """
    Input a user has to change: a config, a file, a dataset. The message names the problem and
    the fix in one line; the command-line scripts print it without a traceback.
    """


def add_retinamask_config(cfg):
    """
    Add the config keys of RetinaMask (Fu, Shvets, Berg 2019) under ``MODEL.RETINAMASK``;
    everything else keeps its place in detectron2's own config.
    """
    _C = cfg
    _C.MODEL.RETINAMASK = CN()

    # Sec. 3.1: anchor assignment. "BestMatchMatcher" applies MODEL.RETINANET.IOU_THRESHOLDS and
    # then gives every ground truth its best-matching anchors.
    _C.MODEL.RETINAMASK.ANCHOR_MATCHER = CN()
    _C.MODEL.RETINAMASK.ANCHOR_MATCHER.NAME = "BestMatchMatcher"
    # Sec. 3.1, Table 1: a ground truth's best anchors become positive when their IoU is strictly
    # greater than this. 0.0 (any overlap) was best; 0.5 or more is plain RetinaNet matching.
    _C.MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD = 0.0
    # Sec. 3.1: the ground truth of an anchor promoted as a best match: "max_iou", the one it
    # overlaps most (the reference's Matcher.set_low_quality_matches_), or "best_matched", the
    # one it overlaps most among those it is a best match of.
    _C.MODEL.RETINAMASK.ANCHOR_MATCHER.PROMOTED_MATCH = "best_matched"

    # Sec. 3.2: box regression loss, "SelfAdjustingSmoothL1Loss" or the fixed "SmoothL1Loss".
    _C.MODEL.RETINAMASK.BOX_REG_LOSS = CN()
    _C.MODEL.RETINAMASK.BOX_REG_LOSS.NAME = "SelfAdjustingSmoothL1Loss"
    # Sec. 3.2, Eq. 2, Table 2: the upper clamp bound beta-hat of the self-adjusting loss (0.11
    # was best), or the fixed loss's beta. In the units of MODEL.RETINANET.BBOX_REG_WEIGHTS' deltas:
    # the paper's 0.11 is for weights (10, 10, 5, 5).
    _C.MODEL.RETINAMASK.BOX_REG_LOSS.BETA = 0.11
    # Sec. 3.2, Eq. 2: momentum m of the running mean and variance of |x|.
    _C.MODEL.RETINAMASK.BOX_REG_LOSS.MOMENTUM = 0.9
    # What divides loss_cls: "positives", RetinaNet's EMA of the number of positive anchors (as
    # loss_box_reg), or "positives+images", that plus the number of images, as the reference
    # (rpn/retinanet_loss.py).
    _C.MODEL.RETINAMASK.LOSS_CLS_NORMALIZER = "positives"
    # Weight of loss_box_reg, as ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT (0.25 in the paper's configs).
    _C.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT = 1.0

    # Sec. 3.4: the detector's own top detections (after NMS) used as mask proposals per training
    # image; the ground-truth boxes are added to them.
    _C.MODEL.RETINAMASK.NUM_MASK_PROPOSALS_TRAIN = 100
    # Mask proposals with IoU at least this to a ground truth are trained on that object's mask.
    _C.MODEL.RETINAMASK.MASK_FG_IOU_THRESHOLD = 0.5
    # Sec. 3.3, Table 3: FPN levels the mask head pools from (Eq. 3 picks one per proposal).
    _C.MODEL.RETINAMASK.MASK_IN_FEATURES = ["p3", "p4", "p5"]
    # Sec. 3.5: masks are predicted for this many top detections; the other detections get
    # all-zero masks, which the evaluator leaves out of mask AP. <= 0: masks for all.
    _C.MODEL.RETINAMASK.NUM_MASKS_TEST = 50

    # Conventions where the reference (the authors' maskrcnn-benchmark code) and detectron2
    # differ; configs/original/ select the reference's for its released models. Test-time
    # resize: "detectron2" (ResizeShortestEdge, rounds) or "reference" (Resize.get_size of
    # maskrcnn_benchmark/data/transforms/transforms.py: floors the long side).
    _C.MODEL.RETINAMASK.TEST_RESIZE = "detectron2"
    # Mask paste: "detectron2" (paste_masks_in_image) or "reference" (its Masker: padded mask,
    # integer inclusive box, PIL bilinear; detectron2's paste_mask_in_image_old).
    _C.MODEL.RETINAMASK.MASK_PASTE = "detectron2"
    # Clip decoded boxes to the image before NMS, at test time and when picking the training
    # mask proposals (the reference's rpn/retinanet_infer.py); detectron2 clips after NMS.
    _C.MODEL.RETINAMASK.CLIP_BEFORE_NMS = False
    # Pool mask features over the reference's inclusive boxes (x1, y1, x2 - 1, y2 - 1), the level
    # of Eq. 3 taken from the box's full area as the reference's LevelMapper does, and rasterise
    # the training mask targets in the same inclusive boxes.
    _C.MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES = False
    # The boxes the COCO evaluator writes: "detectron2" (x1, y1, x2 - x1, y2 - y1 of the box
    # scaled to the image) or "reference" (its inclusive box scaled to the image, then the +1 of
    # inclusive widths and heights: prepare_for_coco_detection in engine/inference.py).
    _C.MODEL.RETINAMASK.COCO_BOXES = "detectron2"

    # The reference's network (Base-RetinaMask.yaml, configs/original/):
    # build_retinamask_resnet_fpn_backbone computes P6 from this feature, "p5" as the reference
    # does, "res5" as detectron2's RetinaNet does,
    _C.MODEL.RETINAMASK.TOP_BLOCK_IN_FEATURE = "p5"
    # and, with MODEL.FPN.NORM set, keeps the FPN convolutions' biases (detectron2 drops them).
    _C.MODEL.RETINAMASK.FPN_CONV_BIAS = True
    # Its frozen BatchNorm at test time: "detectron2" (the fused F.batch_norm) or "reference"
    # (x * scale + bias, as the reference's FrozenBatchNorm2d computes it; detectron2 does too when
    # gradients are needed). The two round differently, ~1e-5 of ResNet-101's last features.
    _C.MODEL.RETINAMASK.FROZEN_BN = "detectron2"


def get_retinamask_cfg(config_file=None, opts=()):
    """
    The one way this project builds a config: detectron2's defaults, the keys of
    :func:`add_retinamask_config`, then ``config_file`` (with its ``_BASE_`` chain) and the
    ``KEY VALUE`` pairs of ``opts``. The result is not frozen.

    Raises:
        InputError: ``config_file`` is missing or is not a YAML mapping, a key does not exist or
            has a value of another type, or a key of :data:`CHOICES` has another value.
    """
    cfg = get_cfg()
    add_retinamask_config(cfg)
    if config_file:
        _check_config_file(config_file)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:
        # yacs names the key in its message: a key that does not exist, or a value of another type.
        raise InputError(_merge_problem(cfg, str(e.args[0] if e.args else e))) from None
    _check_values(cfg)
    return cfg


def _merge_problem(cfg, message: str) -> str:
    missing = re.search(r"Non-existent (?:config )?key: (\S+)", message)
    if missing:
        key = missing.group(1)
        close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.8)
        hint = f" Did you mean {close[0]}?" if close else ""
        return (
            f"Config key {key} does not exist.{hint} Fix its spelling (the keys are detectron2's "
            "and MODEL.RETINAMASK's, retinamask_d2/config.py)."
        )
    mismatch = re.search(r"\(<class '(\w+)'> vs\. <class '(\w+)'>\) .* config key: (\S+)", message)
    if mismatch:
        wanted, given, key = mismatch.groups()
        return (
            f"Config key {key} takes a value of type {wanted}, not {given}: write it as its "
            f"default is written (e.g. 1.0, not 1, for a float; a tuple as \"(1, 2)\")."
        )
    if message.startswith("Override list has odd length"):
        return "Config options must be KEY VALUE pairs; one value is missing: " + message
    return f"Config: {message}"


def _all_keys(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, CN):
            yield from _all_keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def _check_config_file(path):
    if not os.path.isfile(path):
        raise InputError(
            f"Config file {path!r} does not exist. Pass the path of a YAML config, e.g. "
            "configs/synthetic/retinamask_synthetic.yaml; the shipped ones are under configs/."
        )
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = str(e).replace("\n", " ")
        raise InputError(f"Config file {path!r} is not valid YAML ({problem}). Fix its syntax.")
    if not isinstance(content, dict):
        raise InputError(
            f"Config file {path!r} is not a YAML mapping of config keys (it holds "
            f"{type(content).__name__}). Pass a config such as configs/retinamask_R50.yaml."
        )


# The keys that take one of a few values: each value, and what it means.
CHOICES = {
    "MODEL.RETINAMASK.ANCHOR_MATCHER.PROMOTED_MATCH": {
        "max_iou": "the reference's",
        "best_matched": "the ground truth it is best for",
    },
    "MODEL.RETINAMASK.LOSS_CLS_NORMALIZER": {
        "positives": "detectron2's",
        "positives+images": "the reference's",
    },
    "MODEL.RETINAMASK.TEST_RESIZE": {
        "detectron2": "ResizeShortestEdge, rounds",
        "reference": "floors the long side",
    },
    "MODEL.RETINAMASK.MASK_PASTE": {
        "detectron2": "paste_masks_in_image",
        "reference": "the authors' Masker",
    },
    "MODEL.RETINAMASK.COCO_BOXES": {
        "detectron2": "x2 - x1 of the box in the image",
        "reference": "its inclusive box in the image, plus one",
    },
    "MODEL.RETINAMASK.FROZEN_BN": {
        "detectron2": "fused F.batch_norm",
        "reference": "x * scale + bias, as the reference",
    },
}


def check_choice(key: str, value: str):
    """Raise an :class:`InputError` naming ``key`` unless ``value`` is one of ``CHOICES[key]``."""
    if value not in CHOICES[key]:
        options = " or ".join(f"{k!r} ({meaning})" for k, meaning in CHOICES[key].items())
        raise InputError(f"{key} is {value!r}; set it to {options}.")


_RETINAMASK_BACKBONE = "build_retinamask_resnet_fpn_backbone"


def _check_values(cfg):
    # Checked as the config is built, so that a run stops before it writes or trains anything;
    # the classes that use these keys check them again, for configs changed afterwards.
    for key in CHOICES:
        check_choice(key, _value(cfg, key))
    backbone = cfg.MODEL.BACKBONE.NAME
    if cfg.MODEL.RETINAMASK.FROZEN_BN != "detectron2" and backbone != _RETINAMASK_BACKBONE:
        raise InputError(
            f"MODEL.RETINAMASK.FROZEN_BN {cfg.MODEL.RETINAMASK.FROZEN_BN!r} is applied by "
            f"{_RETINAMASK_BACKBONE}, not by MODEL.BACKBONE.NAME {backbone!r}. Set "
            f"MODEL.BACKBONE.NAME to {_RETINAMASK_BACKBONE!r}, or FROZEN_BN to 'detectron2'."
        )


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg

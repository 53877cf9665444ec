"""
RetinaMask (Fu, Shvets, Berg 2019) for detectron2. Importing this package registers its
meta-architecture, anchor matcher, box regression losses, the backbone and anchor generator of
the authors' released models, and the synthetic_shapes datasets. ``Predictor`` is detectron2's
DefaultPredictor with the config's test-time resize.
"""

from .build import (
    ANCHOR_MATCHER_REGISTRY,
    BOX_REG_LOSS_REGISTRY,
    build_anchor_matcher,
    build_box_reg_loss,
)
from .box_reg_loss import SelfAdjustingSmoothL1Loss, SmoothL1Loss
from .config import InputError, add_retinamask_config, get_retinamask_cfg
from .conventions import Predictor, build_test_resize
from .evaluation import TopDetectionsCOCOEvaluator, build_coco_evaluator
from .matcher import BestMatchMatcher
from .original import DetectronAnchorGenerator, build_retinamask_resnet_fpn_backbone
from .retinamask import RetinaMask

from . import data as _  # only registration of the synthetic_shapes datasets
from . import model_zoo  # registers the retinamask:// path prefix

__version__ = "0.1.0"

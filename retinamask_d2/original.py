"""
Compatibility with the authors' released RetinaMask models (chengyangfu/retinamask, a
maskrcnn-benchmark fork): the network parts that detectron2 has differently, and the converter
of their checkpoints. Their test-time conventions are in ``conventions.py``, selected by
``configs/original/*.yaml``.
"""

import math
import os
import re
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    BufferList,
    DefaultAnchorGenerator,
)
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .checkpoint import load_error_reason, write_atomically
from .config import InputError, check_choice

__all__ = [
    "DetectronAnchorGenerator",
    "build_retinamask_resnet_fpn_backbone",
    "NEVER_SAVED",
    "OriginalCheckpointError",
    "ReferenceFrozenBatchNorm2d",
    "convert_original_checkpoint",
    "convert_original_file",
    "load_original_checkpoint",
]


@ANCHOR_GENERATOR_REGISTRY.register()
class DetectronAnchorGenerator(DefaultAnchorGenerator):
    """
    The anchors of Detectron and of the reference: each aspect ratio's shape is rounded to whole
    pixels on a stride x stride cell, then scaled to each size. With ``OFFSET 0.5`` they are the
    reference's in detectron2's box convention (its inclusive x2, y2 plus one), in detectron2's
    order (sizes outer, aspect ratios inner).
    """

    def _calculate_anchors(self, sizes, aspect_ratios):
        # Per level, (len(sizes) * len(aspect_ratios), 4) XYXY cell anchors centred at (0, 0).
        cell_anchors = []
        for stride, level_sizes, ratios in zip(self.strides, sizes, aspect_ratios):
            anchors = []
            for size in level_sizes:
                for ratio in ratios:
                    # numpy rounds half to even, as the reference does.
                    w = np.round(np.sqrt(stride * stride / ratio))
                    h = np.round(w * ratio)
                    w, h = w * size / stride, h * size / stride
                    anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
            cell_anchors.append(torch.tensor(anchors, dtype=torch.float32))
        return BufferList(cell_anchors)


@BACKBONE_REGISTRY.register()
def build_retinamask_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    detectron2's RetinaNet ResNet-FPN (outputs P3-P7) with P6 computed from
    ``MODEL.RETINAMASK.TOP_BLOCK_IN_FEATURE`` ("p5" in the reference, "res5" in detectron2),
    with ``MODEL.FPN.NORM`` and ``MODEL.RETINAMASK.FPN_CONV_BIAS``, FPN convolutions with a bias
    as in the reference's GroupNorm FPN (detectron2 drops it), and with
    ``MODEL.RETINAMASK.FROZEN_BN`` "reference", the reference's frozen BatchNorm arithmetic.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    frozen_bn = cfg.MODEL.RETINAMASK.FROZEN_BN
    check_choice("MODEL.RETINAMASK.FROZEN_BN", frozen_bn)
    if frozen_bn == "reference":
        for module in bottom_up.modules():
            if type(module) is FrozenBatchNorm2d:
                module.__class__ = ReferenceFrozenBatchNorm2d
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_in_feature = cfg.MODEL.RETINAMASK.TOP_BLOCK_IN_FEATURE
    last_fpn_level = "p{}".format(int(math.log2(bottom_up.output_shape()[in_features[-1]].stride)))
    if top_in_feature == last_fpn_level:
        top_in_channels = out_channels
    elif top_in_feature in bottom_up.output_shape():
        top_in_channels = bottom_up.output_shape()[top_in_feature].channels
    else:
        raise InputError(
            f"MODEL.RETINAMASK.TOP_BLOCK_IN_FEATURE is {top_in_feature!r}; P6 is computed from "
            f"the last FPN level {last_fpn_level!r} (as the reference) or from a ResNet output "
            f"such as 'res5' (as detectron2's RetinaNet)."
        )
    backbone = FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(top_in_channels, out_channels, in_feature=top_in_feature),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    if cfg.MODEL.FPN.NORM and cfg.MODEL.RETINAMASK.FPN_CONV_BIAS:
        for conv in backbone.lateral_convs + backbone.output_convs:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    return backbone


class ReferenceFrozenBatchNorm2d(FrozenBatchNorm2d):
    """
    detectron2's :class:`FrozenBatchNorm2d` computing ``x * scale + bias`` at test time too, as
    the reference's FrozenBatchNorm2d does, where detectron2's calls the fused ``F.batch_norm``.
    With the statistics the converter folds in, scale and bias are the reference's own, bit for
    bit, and so is every backbone feature.
    """

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype)


class OriginalCheckpointError(InputError):
    """Not a checkpoint of the reference's RetinaMask, or not one for the config at hand."""


# The reference's parameter names -> detectron2's, as (pattern, replacement) tried in order.
# The reference names ResNet stages layer1..layer4 (detectron2 res2..res5) and its FPN blocks
# fpn_inner2..4 / fpn_layer2..4 for C3..C5 (detectron2 fpn_lateral3..5 / fpn_output3..5);
# a GroupNorm FPN block is a Sequential of (conv, norm).
_BLOCK, _RES = r"^backbone\.body\.layer(\d)\.(\d+)\.", r"backbone.bottom_up.res{s}.\2."
_RENAMES = [
    (r"^backbone\.body\.stem\.conv1\.", "backbone.bottom_up.stem.conv1."),
    (r"^backbone\.body\.stem\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
    (_BLOCK + r"conv(\d)\.", _RES + r"conv\3."),
    (_BLOCK + r"bn(\d)\.", _RES + r"conv\3.norm."),
    (_BLOCK + r"downsample\.0\.", _RES + "shortcut."),
    (_BLOCK + r"downsample\.1\.", _RES + "shortcut.norm."),
    (r"^backbone\.fpn\.fpn_inner(\d)\.1\.", r"backbone.fpn_lateral{s}.norm."),
    (r"^backbone\.fpn\.fpn_inner(\d)\.(0\.)?", r"backbone.fpn_lateral{s}."),
    (r"^backbone\.fpn\.fpn_layer(\d)\.1\.", r"backbone.fpn_output{s}.norm."),
    (r"^backbone\.fpn\.fpn_layer(\d)\.(0\.)?", r"backbone.fpn_output{s}."),
    (r"^backbone\.fpn\.top_blocks\.", "backbone.top_block."),
    (r"^rpn\.head\.(cls|bbox)_tower\.", r"head.\1_subnet."),
    (r"^rpn\.head\.cls_logits\.", "head.cls_score."),
    (r"^rpn\.head\.bbox_pred\.", "head.bbox_pred."),
    (r"^mask\.feature_extractor\.mask_fcn(\d)\.", r"mask_head.mask_fcn\1."),
    (r"^mask\.predictor\.conv5_mask\.", "mask_head.deconv."),
    (r"^mask\.predictor\.mask_fcn_logits\.", "mask_head.predictor."),
]
_CELL_ANCHORS = re.compile(r"^rpn\.anchor_generator\.cell_anchors\.(\d+)$")
# Present in every checkpoint of the reference's RetinaNet, whatever its depth or norm.
_REQUIRED = ("backbone.body.stem.conv1.weight", "rpn.head.cls_logits.weight")
# Buffers of this package's model that the reference keeps outside its model (its loss
# statistics) or does not have: a converted checkpoint cannot provide them.
NEVER_SAVED = ("box_reg_loss.running_mean", "box_reg_loss.running_var", "loss_normalizer")


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        m = re.match(pattern, key)
        if m:
            if "{s}" in replacement:  # stage numbers are one higher in detectron2
                replacement = replacement.replace("{s}", str(int(m.group(1)) + 1))
            return m.expand(replacement) + key[m.end() :]
    return key  # of another architecture: reported as a weight the model does not have


def load_original_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """
    Read a checkpoint as the reference's trainer writes it (``{"model", "optimizer",
    "scheduler", "iteration"}``, or a bare state dict), in torch's zip or legacy format, with
    ``weights_only=True``. DistributedDataParallel's ``module.`` prefix is removed.

    Returns:
        dict[str, Tensor]: the model's state dict, in the reference's names.
    """
    try:
        with open(path, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError) as e:  # "no such file", "is a directory"
        raise OriginalCheckpointError(f"{path}: {e.strerror.lower()}.") from None
    except Exception as e:
        raise OriginalCheckpointError(
            f"{path}: cannot be read as a torch checkpoint ({load_error_reason(e)}); the file is "
            "truncated, corrupt, or not a checkpoint. Download it again."
        ) from None
    model = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    items = model.items() if isinstance(model, dict) else ()
    # Only tensors can be weights; a file without any lacks the keys checked below.
    state_dict = {k.removeprefix("module."): v for k, v in items if isinstance(v, torch.Tensor)}
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        hint = ""
        if any(k.startswith("backbone.bottom_up.") for k in state_dict):
            hint = " It is a detectron2 checkpoint: load it with MODEL.WEIGHTS, no conversion."
        raise OriginalCheckpointError(
            f"{path}: not a checkpoint of the reference's RetinaMask: the keys {missing} are "
            f"absent.{hint}"
        )
    return state_dict


def _fold_frozen_bn(converted: Dict[str, torch.Tensor], prefix: str, eps: float = 1e-5):
    # The reference's FrozenBatchNorm2d scales by running_var**-0.5, detectron2's by
    # (running_var + eps)**-0.5. Folding the statistics into the affine part, with detectron2's
    # identity statistics (mean 0, var 1 - eps), gives the reference's function exactly.
    names = [prefix + k for k in ("weight", "bias", "running_mean", "running_var")]
    weight, bias, mean, var = (converted[k] for k in names)
    scale = weight * var.rsqrt()
    folded = (scale, bias - mean * scale, torch.zeros_like(mean), torch.full_like(var, 1.0 - eps))
    converted.update(zip(names, folded))


def _check_cell_anchors(state_dict, anchor_generator, perm: List[int]) -> None:
    # The reference saves its cell anchors (inclusive x2, y2, for the cell at (0, 0)); they
    # must be the config's anchors, or every converted box would be decoded from a wrong one.
    saved = {int(m.group(1)): v for k, v in state_dict.items() if (m := _CELL_ANCHORS.match(k))}
    if not saved:
        return
    gen = anchor_generator
    ours = [c + gen.offset * stride for c, stride in zip(gen.cell_anchors, gen.strides)]
    if sorted(saved) != list(range(len(ours))) or any(
        saved[level].shape != cell.shape for level, cell in enumerate(ours)
    ):
        raise OriginalCheckpointError(
            f"the checkpoint has {[len(saved[k]) for k in sorted(saved)]} anchors per location "
            f"at its feature levels, the config {[len(c) for c in ours]} "
            "(MODEL.RETINANET.IN_FEATURES, MODEL.ANCHOR_GENERATOR)."
        )
    for level, expected in enumerate(ours):
        reference = saved[level][perm] + saved[level].new_tensor([0.0, 0.0, 1.0, 1.0])
        if not torch.allclose(reference, expected, atol=1e-3):
            raise OriginalCheckpointError(
                f"the checkpoint's anchors at level {level} ({reference.tolist()}) differ from "
                f"the config's ({expected.tolist()}): use MODEL.ANCHOR_GENERATOR.NAME "
                "DetectronAnchorGenerator with OFFSET 0.5 and the reference's sizes."
            )


def convert_original_checkpoint(state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg):
    """
    Convert the state dict of a reference RetinaMask (as :func:`load_original_checkpoint`
    returns it) to the names and layouts of ``model``, built from ``cfg``, checked to load into
    it with no unexpected, wrong-shaped or missing weights but the buffers in ``NEVER_SAVED``.

    Returns:
        converted (dict[str, Tensor]): detectron2 names.
        dropped (dict[str, str]): reference keys left out, and why.
    """
    num_sizes = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0])
    num_ratios = len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
    # detectron2's cell anchor (size s, ratio r) is s * R + r, the reference's r * S + s.
    perm = [r * num_sizes + s for s in range(num_sizes) for r in range(num_ratios)]
    _check_cell_anchors(state_dict, model.anchor_generator, perm)
    converted, dropped = {}, {}
    for key, value in state_dict.items():
        if _CELL_ANCHORS.match(key):
            dropped[key] = "anchors are generated by DetectronAnchorGenerator (and checked)"
        else:
            converted[_rename(key)] = value.detach().clone()
    # The reference's mask predictor has a channel for the background class 0; detectron2's
    # class k is the reference's k + 1.
    for key in ("mask_head.predictor.weight", "mask_head.predictor.bias"):
        if key in converted:
            converted[key] = converted[key][1:]
            dropped[key] = "row 0 (background class) of the mask predictor dropped"

    expected = model.state_dict()
    unexpected = [k for k in converted if k not in expected]
    wrong_shape = [
        f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in converted and converted[k].shape != v.shape
    ]
    missing = [k for k in expected if k not in converted and k not in NEVER_SAVED]
    for problem, keys in (
        ("weights the config's model does not have", unexpected),
        ("weights of another shape than the config's model (checkpoint vs model)", wrong_shape),
        ("weights the config's model needs and the checkpoint lacks", missing),
    ):
        if keys:
            raise OriginalCheckpointError(
                f"the checkpoint does not fit the config: {len(keys)} {problem}, e.g. "
                f"{keys[:3]}. Use the configs/original/*.yaml file of this model."
            )

    # Shapes now match the model's: fold the statistics and reorder the head's outputs.
    for key in [k for k in converted if k.endswith(".norm.running_var")]:
        _fold_frozen_bn(converted, key[: -len("running_var")])
    for key in [f"head.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")]:
        # Output channels of the head's last convolutions are (anchor, per-anchor values).
        t = converted[key]
        converted[key] = t.reshape(len(perm), -1, *t.shape[1:])[perm].reshape(t.shape)
    return converted, dropped


def convert_original_file(cfg, src: str, dst: str) -> Dict[str, object]:
    """
    Convert the reference checkpoint file ``src`` for the model of ``cfg`` and write a
    detectron2 checkpoint to ``dst``. ``dst`` appears only once it is complete.

    Returns:
        dict: a summary, with "converted" (number of tensors), "parameters" (number of
        values), "dropped" (dict key -> reason) and "not_in_checkpoint" (buffers that start
        from their initial values).
    """
    state_dict = load_original_checkpoint(src)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    converted, dropped = convert_original_checkpoint(state_dict, model, cfg)
    dropped["optimizer, scheduler, iteration"] = "training state of the reference run"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    checkpoint = {"model": converted, "__author__": __name__}
    write_atomically(dst, "wb", lambda f: torch.save(checkpoint, f))
    return {
        "converted": len(converted),
        "parameters": sum(v.numel() for v in converted.values()),
        "dropped": dropped,
        "not_in_checkpoint": [k for k in model.state_dict() if k not in converted],
    }

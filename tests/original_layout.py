"""
Synthetic checkpoints in the layout of the authors' RetinaMask (chengyangfu/retinamask,
maskrcnn-benchmark): the parameter names and shapes its ResNet-FPN RetinaNet with a mask head
saves, filled with random values.
"""

from collections import OrderedDict

import numpy as np
import torch

NUM_CLASSES = 80  # the reference's heads: 80 sigmoid classes, 81 mask channels (background 0)
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _bn(sd, prefix, channels, gen):
    sd[prefix + "weight"] = torch.rand(channels, generator=gen) + 0.5
    sd[prefix + "bias"] = torch.randn(channels, generator=gen) * 0.1
    sd[prefix + "running_mean"] = torch.randn(channels, generator=gen) * 0.1
    sd[prefix + "running_var"] = torch.rand(channels, generator=gen) + 0.5


def _conv(sd, prefix, out_channels, in_channels, k, gen, bias=True):
    sd[prefix + "weight"] = torch.randn(out_channels, in_channels, k, k, generator=gen) * 0.01
    if bias:
        sd[prefix + "bias"] = torch.randn(out_channels, generator=gen) * 0.01


def _reference_cell_anchors(stride, sizes):
    """
    The reference's cell anchors as its generate_anchors defines them: inclusive
    coordinates, centred on ((stride - 1) / 2, (stride - 1) / 2), aspect ratios (0.5, 1, 2)
    outer. tests/test_original.py checks level 0 against a table worked out by hand.
    """
    center = (stride - 1) / 2.0
    anchors = []
    for ratio in (0.5, 1.0, 2.0):
        w0 = np.round(np.sqrt(stride * stride / ratio))
        h0 = np.round(w0 * ratio)
        for size in sizes:
            w, h = w0 * size / stride, h0 * size / stride
            anchors.append(
                [
                    center - (w - 1) / 2,
                    center - (h - 1) / 2,
                    center + (w - 1) / 2,
                    center + (h - 1) / 2,
                ]
            )
    return torch.tensor(anchors, dtype=torch.float32)


def original_state_dict(depth=50, gn=False, groups=1, width_per_group=64, seed=0):
    """
    Returns:
        OrderedDict[str, Tensor]: a state dict named and shaped as the reference's
        RetinaNet (P3-P7, 9 anchors, 80 classes) with its mask head.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    _conv(sd, "backbone.body.stem.conv1.", 64, 3, 7, gen, bias=False)
    _bn(sd, "backbone.body.stem.bn1.", 64, gen)
    in_channels, bottleneck = 64, groups * width_per_group
    for stage, num_blocks in enumerate(BLOCKS[depth], 1):
        out_channels = 256 * 2 ** (stage - 1)
        for block in range(num_blocks):
            p = f"backbone.body.layer{stage}.{block}."
            if block == 0:
                _conv(sd, p + "downsample.0.", out_channels, in_channels, 1, gen, bias=False)
                _bn(sd, p + "downsample.1.", out_channels, gen)
            _conv(sd, p + "conv1.", bottleneck, in_channels, 1, gen, bias=False)
            _bn(sd, p + "bn1.", bottleneck, gen)
            _conv(sd, p + "conv2.", bottleneck, bottleneck // groups, 3, gen, bias=False)
            _bn(sd, p + "bn2.", bottleneck, gen)
            _conv(sd, p + "conv3.", out_channels, bottleneck, 1, gen, bias=False)
            _bn(sd, p + "bn3.", out_channels, gen)
            in_channels = out_channels
        bottleneck *= 2

    for level, channels in zip((2, 3, 4), (512, 1024, 2048)):
        for name, c_in, k in (("fpn_inner", channels, 1), ("fpn_layer", 256, 3)):
            p = f"backbone.fpn.{name}{level}."
            if gn:  # the reference's GN FPN block: Sequential(Conv2d with bias, GroupNorm)
                _conv(sd, p + "0.", 256, c_in, k, gen)
                sd[p + "1.weight"] = torch.rand(256, generator=gen) + 0.5
                sd[p + "1.bias"] = torch.randn(256, generator=gen) * 0.1
            else:
                _conv(sd, p, 256, c_in, k, gen)
    _conv(sd, "backbone.fpn.top_blocks.p6.", 256, 256, 3, gen)
    _conv(sd, "backbone.fpn.top_blocks.p7.", 256, 256, 3, gen)

    for level, stride in enumerate((8, 16, 32, 64, 128)):
        sizes = [32 * 2**level * 2 ** (i / 3) for i in range(3)]
        sd[f"rpn.anchor_generator.cell_anchors.{level}"] = _reference_cell_anchors(stride, sizes)
    for tower in ("cls_tower", "bbox_tower"):
        step = 3 if gn else 2  # (conv, [GroupNorm,] ReLU) per layer
        for i in range(4):
            _conv(sd, f"rpn.head.{tower}.{i * step}.", 256, 256, 3, gen)
            if gn:
                sd[f"rpn.head.{tower}.{i * step + 1}.weight"] = torch.rand(256, generator=gen) + 0.5
                sd[f"rpn.head.{tower}.{i * step + 1}.bias"] = torch.randn(256, generator=gen) * 0.1
    _conv(sd, "rpn.head.cls_logits.", 9 * NUM_CLASSES, 256, 3, gen)
    _conv(sd, "rpn.head.bbox_pred.", 9 * 4, 256, 3, gen)

    for i in range(1, 5):
        _conv(sd, f"mask.feature_extractor.mask_fcn{i}.", 256, 256, 3, gen)
    # ConvTranspose2d weights are (in, out, k, k).
    _conv(sd, "mask.predictor.conv5_mask.", 256, 256, 2, gen)
    _conv(sd, "mask.predictor.mask_fcn_logits.", NUM_CLASSES + 1, 256, 1, gen)
    return sd


def trainer_checkpoint(state_dict, ddp=False):
    """The dict the reference's trainer saves: model, optimizer, scheduler, iteration."""
    if ddp:
        state_dict = OrderedDict(("module." + k, v) for k, v in state_dict.items())
    return {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]},
        "scheduler": {"milestones": [240000, 320000], "gamma": 0.1, "last_epoch": 360000},
        "iteration": 360000,
    }

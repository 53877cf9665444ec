#!/usr/bin/env python
"""
Run the authors' code (chengyangfu/retinamask, a maskrcnn-benchmark fork) and write what it
gives to files that the comparison tools of this project read. Run it in the authors'
environment, from any directory, naming their checkout:

    python tools/original_reference.py --maskrcnn-benchmark /path/to/retinamask COMMAND ...

retinamask_d2 itself never imports maskrcnn_benchmark: this script is the only place that
does, by the path given. Where the authors' compiled ops were not built (their build needs
PyTorch 1.0 and CUDA), it supplies them from torchvision, with the authors' conventions: NMS on
boxes with inclusive x2, y2 (+1 pixel), RoIAlign with aligned=False, and the sigmoid focal loss
in plain torch; and it fills in the few names that later PyTorch releases removed.
"""

import argparse
import importlib
import os
import sys
import types
import urllib.parse

import numpy as np
import torch
import torch.distributed
import torch.hub
import torch.utils.model_zoo
import torchvision


def _nms(boxes, scores, threshold):
    # The authors' kernel computes areas and overlaps with inclusive x2, y2.
    return torchvision.ops.nms(boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), scores, threshold)


def _roi_align_forward(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio):
    return torchvision.ops.roi_align(
        features, rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned=False
    )


def _roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, n, c, h, w, sampling):
    return torch.ops.torchvision._roi_align_backward(
        grad, rois, spatial_scale, pooled_h, pooled_w, n, c, h, w, sampling, False
    )


def _focal_loss_terms(logits, targets, num_classes, gamma, alpha):
    # Per element, as the authors' kernel: targets are class ids in 1..num_classes, 0 is
    # background (every class negative), -1 ignored (no loss).
    classes = torch.arange(1, num_classes + 1, device=logits.device)
    t = targets.view(-1, 1)
    positive = (t == classes).to(logits.dtype)
    negative = ((t != classes) & (t >= 0)).to(logits.dtype)
    p = logits.sigmoid()
    pos_term = -alpha * (1 - p) ** gamma * torch.nn.functional.logsigmoid(logits)
    neg_term = -(1 - alpha) * p**gamma * torch.nn.functional.logsigmoid(-logits)
    return positive * pos_term + negative * neg_term


def _focal_loss_forward(logits, targets, num_classes, gamma, alpha):
    return _focal_loss_terms(logits, targets, num_classes, gamma, alpha)


def _focal_loss_backward(logits, targets, d_loss, num_classes, gamma, alpha):
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        loss = _focal_loss_terms(x, targets, num_classes, gamma, alpha)
        (grad,) = torch.autograd.grad(loss, x, d_loss)
    return grad


def _install_compatibility():
    """The authors' compiled ops from torchvision, and names later PyTorch releases removed."""
    ops = types.ModuleType("maskrcnn_benchmark._C")
    ops.nms = _nms
    ops.roi_align_forward = _roi_align_forward
    ops.roi_align_backward = _roi_align_backward
    ops.sigmoid_focalloss_forward = _focal_loss_forward
    ops.sigmoid_focalloss_backward = _focal_loss_backward
    sys.modules["maskrcnn_benchmark._C"] = ops

    six = types.ModuleType("torch._six")
    six.PY3, six.string_classes, six.int_classes = True, (str, bytes), int
    sys.modules["torch._six"] = torch._six = six
    sys.modules["torch.distributed.deprecated"] = torch.distributed
    model_zoo = torch.utils.model_zoo
    model_zoo._download_url_to_file = torch.hub.download_url_to_file
    model_zoo.urlparse = urllib.parse.urlparse
    model_zoo.HASH_REGEX = torch.hub.HASH_REGEX
    np.float, np.int = float, int  # numpy aliases removed in 1.24


def load_maskrcnn_benchmark(checkout: str) -> types.ModuleType:
    """Import the authors' package from ``checkout``, with torchvision's ops where theirs are not
    built."""
    if not os.path.isdir(os.path.join(checkout, "maskrcnn_benchmark")):
        sys.exit(f"ERROR: {checkout!r} holds no maskrcnn_benchmark/: pass the authors' checkout.")
    sys.path.insert(0, os.path.abspath(checkout))
    try:
        importlib.import_module("maskrcnn_benchmark._C")
    except ImportError:
        _install_compatibility()
    return importlib.import_module("maskrcnn_benchmark")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maskrcnn-benchmark", required=True, metavar="DIR",
                        help="the authors' checkout (chengyangfu/retinamask)")  # fmt: skip
    parser.add_subparsers(dest="command", required=True)
    args = parser.parse_args(argv)
    load_maskrcnn_benchmark(args.maskrcnn_benchmark)
    return 0


if __name__ == "__main__":
    sys.exit(main())

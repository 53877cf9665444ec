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


def _index_masks_with_bool():
    # Their SegmentationMask takes a uint8 tensor as a mask and any other tensor as indices;
    # since PyTorch 1.2 comparisons give bool, which it would read as indices 0 and 1.
    from maskrcnn_benchmark.structures.segmentation_mask import SegmentationMask

    getitem = SegmentationMask.__getitem__

    def __getitem__(self, item):
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            item = item.nonzero().squeeze(1)
        return getitem(self, item)

    SegmentationMask.__getitem__ = __getitem__


def _load_batch(cfg, batch_dir):
    """The images of ``batch_dir`` as the authors' loader gives them without resize and flip
    (their COCODataset, ToTensor, Normalize), and their targets."""
    from maskrcnn_benchmark.data.datasets.coco import COCODataset
    from maskrcnn_benchmark.data.transforms import transforms as T
    from maskrcnn_benchmark.structures.image_list import to_image_list

    to_input = T.Compose([T.ToTensor(), T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)])
    # Their transforms applied here: later torchvision's CocoDetection would apply them twice.
    dataset = COCODataset(os.path.join(batch_dir, "annotations.json"), batch_dir, False)
    images, targets = zip(*(to_input(*dataset[i][:2]) for i in range(len(dataset))))
    return to_image_list(images, cfg.DATALOADER.SIZE_DIVISIBILITY), list(targets)


@torch.no_grad()
def _calibrate(model, images, targets, seed):
    """
    Seeded random weights with activations of unit scale on ``images``, so that every image has
    detections to train the mask head on: each frozen BatchNorm takes its input's statistics
    and a random affine part, each FPN and head convolution is scaled to unit output std (over
    all levels), the class logits to std 1 around -6 and the box deltas to std 0.2.
    """
    from maskrcnn_benchmark.layers import FrozenBatchNorm2d
    from maskrcnn_benchmark.structures.boxlist_ops import cat_boxlist

    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.GroupNorm))]
    for m in norms:
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0.0, 0.1)
    # Residual branches start small, as in a trained ResNet: a deep stack of unit-gain blocks
    # is chaotic, and float rounding alone would then turn its gradients.
    for name, m in model.backbone.body.named_modules():
        if name.endswith(".bn3"):
            m.weight.uniform_(0.1, 0.3)

    def take_statistics(m, inputs):
        m.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        m.running_var.copy_(inputs[0].var(dim=(0, 2, 3)).clamp(min=1e-4))

    def scale(m, outputs, std=1.0, mean=None):
        # outputs: what m gave, on all levels; rescale m so that they have this std (and mean).
        x = torch.cat([o.flatten() for o in outputs])
        s = x.std() / std
        m.weight.div_(s)
        m.bias.div_(s)
        if mean is not None:
            m.bias.add_(mean - x.mean() / s)

    hooks = [
        m.register_forward_pre_hook(take_statistics)
        for m in model.backbone.body.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    for m in model.backbone.fpn.modules():
        if isinstance(m, torch.nn.Conv2d):  # each is called once: scaled as it runs
            hooks.append(
                m.register_forward_hook(lambda m, i, out: scale(m, [out]) or out / out.std())
            )
    model.eval()
    features = model.backbone(images.tensors)
    for h in hooks:
        h.remove()
    head = model.rpn.head
    output_std = {head.cls_logits: (1.0, -6.0), head.bbox_pred: (0.2, None)}
    # The head runs on every level with the same weights: one module at a time, in order.
    for m in [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]:
        outputs = []
        hook = m.register_forward_hook(lambda m, i, out: outputs.append(out))
        head(features)
        hook.remove()
        scale(m, outputs, *output_std.get(m, (1.0, None)))

    # Random scores put the top detections anywhere. A least-squares probe of the class tower's
    # features per anchor shape, added to every class's logits, gathers them around the
    # objects (and their borders) as a trained detector's, so that many train the mask head.
    tower = [head.cls_tower(f) for f in features]
    anchors = model.rpn.anchor_generator(images, features)
    labels, _ = model.rpn.loss_evaluator.prepare_targets([cat_boxlist(a) for a in anchors], targets)
    num_classes = model.rpn.loss_evaluator.num_classes
    num_anchors = head.cls_logits.out_channels // num_classes
    positive = torch.cat(labels).view(-1, num_anchors).gt(0).to(torch.float64)  # (positions, A)
    x = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in tower], 0).double()
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    w = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1], dtype=x.dtype), x.T @ positive)
    probe = x @ w
    # Positive anchors' logits rise by 3 on average, the others' fall by as much as they lie
    # below the mean.
    gain = 3.0 / ((probe * positive).sum(0) / positive.sum(0).clamp(min=1) - probe.mean(0))
    w = w * gain
    w[-1] -= probe.mean(dim=0) * gain
    weight = head.cls_logits.weight.view(num_anchors, num_classes, -1, 3, 3)
    weight[:, :, :, 1, 1] += w[:-1].T.to(weight.dtype)[:, None, :]
    head.cls_logits.bias.view(num_anchors, num_classes).add_(w[-1].to(weight.dtype)[:, None])


def _record_call(obj, name, records):
    """Replace ``obj.name`` by a wrapper that appends (args, result) of each call to records."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        records.append((args, result))
        return result

    setattr(obj, name, wrapper)


def train_step(args):
    """One training step of the authors' model; writes what the comparison needs."""
    from maskrcnn_benchmark.config import cfg
    from maskrcnn_benchmark.modeling.detector import build_detection_model

    _index_masks_with_bool()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    torch.manual_seed(args.seed)
    model = build_detection_model(cfg)
    images, targets = _load_batch(cfg, args.batch)
    if args.init_weights:
        _calibrate(model, images, targets, args.seed)
        torch.save({"model": model.state_dict()}, args.init_weights)
    else:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))

    anchors, anchor_targets, mask_targets, detections = [], [], [], []
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, out: anchors.append(out))
    _record_call(model.rpn.loss_evaluator, "prepare_targets", anchor_targets)
    _record_call(model.mask.loss_evaluator, "prepare_targets", mask_targets)
    model.rpn.box_selector_train.register_forward_hook(lambda m, i, out: detections.append(out))
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()

    _, (labels, regression_targets) = anchor_targets[0]
    (proposals, _), (mask_labels, _) = mask_targets[0]
    stats = model.rpn.loss_evaluator.regression_loss
    result = {
        "config_file": args.config_file,
        "image_sizes": [list(s) for s in images.image_sizes],
        "anchors_per_level": [len(a) for a in anchors[0][0]],
        "labels": [x.to(torch.int64) for x in labels],
        "regression_targets": regression_targets,
        "losses": {
            "loss_cls": losses["loss_retina_cls"].item(),
            "loss_box_reg": losses["loss_retina_reg"].item(),
            "loss_mask": losses["loss_mask"].item(),
        },
        "box_reg_stats": {"running_mean": stats.running_mean, "running_var": stats.running_var},
        "detections": [
            {"boxes": d.bbox, "scores": d.get_field("scores"), "labels": d.get_field("labels")}
            for d in detections[0]
        ],
        "mask_proposals": [
            {"boxes": p.bbox, "labels": lab} for p, lab in zip(proposals, mask_labels)
        ],
        "gradients": {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        },
    }
    torch.save(result, args.output)
    print(
        f"Wrote {args.output}: loss_cls {result['losses']['loss_cls']:.6g}, loss_box_reg "
        f"{result['losses']['loss_box_reg']:.6g}, loss_mask {result['losses']['loss_mask']:.6g}, "
        f"{sum(int((x > 0).sum()) for x in result['labels'])} positive anchors."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maskrcnn-benchmark", required=True, metavar="DIR",
                        help="the authors' checkout (chengyangfu/retinamask)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("train-step", help=train_step.__doc__)
    step.add_argument("--config-file", required=True, help="the authors' configs/retina/*.yaml")
    step.add_argument("--batch", required=True, metavar="DIR",
                      help="written by tools/compare_original_step.py batch")  # fmt: skip
    weights = step.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", metavar="FILE", help="a checkpoint of the authors' model")
    weights.add_argument("--init-weights", metavar="OUT",
                         help="write seeded random weights, calibrated on the batch, and use them")  # fmt: skip
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--output", required=True, metavar="FILE", help="what the step gave (.pth)")
    step.set_defaults(run=train_step)
    args = parser.parse_args(argv)
    load_maskrcnn_benchmark(args.maskrcnn_benchmark)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
Compare one training step of RetinaMask with the same step of the authors' code, from the same
weights on the same batch (docs/original_training_step.md). Three commands, the second where
the authors' checkout imports (tools/original_reference.py), the others here:

    python3 tools/compare_original_step.py batch step_batch
    python3 tools/original_reference.py --maskrcnn-benchmark /path/to/retinamask train-step \
        --config-file /path/to/retinamask/configs/retina/retinanet_mask_R-50-FPN_2x_adjust_std011_ms.yaml \
        --batch step_batch --init-weights original_R50.pth --output reference_step_R50.pth
    python3 tools/compare_original_step.py compare --config-file configs/retinamask_R50.yaml \
        --batch step_batch --original-weights original_R50.pth --reference reference_step_R50.pth

``batch`` writes two pre-resized images (PNG) and their objects (COCO JSON: boxes, classes and
polygon masks; thin bars, small objects, a 16x16 object inside a 56x56 one, objects touching
the border). ``compare`` converts the authors'-layout weights for the config (to
``original_R50_d2.pth`` next to the reference's file; later runs may pass it as MODEL.WEIGHTS,
with other config options after it), runs one step of ``RetinaMask`` (no augmentation, one
process) and prints one line per check: anchor labels, regression targets, the three losses,
the self-adjusting statistics after the step and every parameter's gradient. It exits with
status 1 when a check misses its target.

The EMA loss normaliser is this package's by design; for the comparison the ``loss_normalizer``
buffer starts at the reference's number of positive anchors, so that this step divides by that
number as the reference does.
"""

import argparse
import json
import os
import sys

import cv2
import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from retinamask_d2 import InputError, SelfAdjustingSmoothL1Loss, get_retinamask_cfg
from retinamask_d2.engine import one_line_errors
from retinamask_d2.original import _rename, convert_original_file

# Per image: (width, height) and its objects as (COCO category id, polygon x1, y1, x2, y2, ...).
# All inside the image, four of them reaching its border.
_BATCH = [
    (
        (640, 480),
        [
            (1, [120, 60, 330, 55, 330, 69, 120, 74]),  # thin bar, 210 x 19
            (17, [400, 300, 412, 296, 409, 311]),  # small, 12 x 15
            (3, [0, 180, 70, 190, 95, 250, 60, 310, 0, 300]),  # at the left border
            (62, [250, 400, 380, 390, 400, 480, 230, 480]),  # at the bottom border
            (45, [580, 170, 525, 265, 415, 265, 360, 170, 415, 75, 525, 75]),  # large
            (20, [150, 250, 206, 250, 206, 306, 150, 306]),  # 56 x 56
            (21, [170, 270, 186, 270, 186, 286, 170, 286]),  # 16 x 16 inside it
        ],
    ),
    (
        (544, 512),
        [
            (1, [60, 100, 74, 100, 76, 300, 62, 300]),  # thin bar, 16 x 200
            (5, [305, 418, 310, 425, 305, 429, 301, 425]),  # small, 9 x 11
            (7, [440, 0, 544, 0, 544, 90, 470, 70]),  # in the top right corner
            (9, [150, 260, 200, 200, 290, 240, 270, 330, 170, 320]),  # overlapping pair
            (9, [230, 290, 300, 250, 360, 300, 340, 380, 250, 370]),
            (80, [0, 440, 120, 430, 130, 512, 0, 512]),  # in the bottom left corner
            (33, [400, 200, 470, 250, 445, 330, 355, 330, 330, 250]),
        ],
    ),
]
BATCH_JSON = "annotations.json"


def write_batch(out_dir: str, seed: int = 0):
    """Write the images (smooth random background, textured objects) and the COCO JSON."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    images, annotations = [], []
    for image_id, ((w, h), objects) in enumerate(_BATCH, start=1):
        low = rng.uniform(40, 200, size=(h // 32, w // 32, 3)).astype(np.float32)
        image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        for category, poly in objects:
            color = rng.uniform(0, 255, size=3)
            layer = np.zeros((h, w), np.uint8)
            points = np.round(np.asarray(poly, np.float64).reshape(-1, 2) * 16).astype(np.int32)
            cv2.fillPoly(layer, [points], 1, lineType=cv2.LINE_8, shift=4)
            texture = rng.normal(0, 20, size=(h, w, 3))
            image = np.where(layer[..., None] > 0, color + texture, image)
            xs, ys = poly[0::2], poly[1::2]
            x, y = min(xs), min(ys)
            area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, max(xs) - x, max(ys) - y],
                    "area": float(area),
                    "iscrowd": 0,
                    "segmentation": [[float(v) for v in poly]],
                }
            )
        file_name = f"step_{image_id}.png"
        cv2.imwrite(os.path.join(out_dir, file_name), np.clip(image, 0, 255).astype(np.uint8))
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    categories = [{"id": i, "name": f"class_{i}"} for i in range(1, 81)]
    with open(os.path.join(out_dir, BATCH_JSON), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def run_step(cfg, batch_dir: str, num_positives: int):
    """
    One training step of the model of ``cfg`` (weights from MODEL.WEIGHTS) on the batch, with
    the EMA loss normaliser starting at ``num_positives``.

    Returns:
        model, losses (dict of scalar tensors), and what the step computed: "anchors" (per
        level Boxes), "labels" and "gt_boxes" (per image, from label_anchors), "detections"
        (per image, the detections among the mask proposals), "mask_rois" (per image,
        the Instances the mask head is trained on) and "box_reg_args" (what the box
        regression loss was called with).
    """
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    dicts = load_coco_json(os.path.join(batch_dir, BATCH_JSON), batch_dir, "retinamask_step")
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[])
    inputs = [mapper(d) for d in dicts]

    seen = {}
    label_anchors, detect = model.label_anchors, model._detect_mask_proposals

    def record_labels(anchors, gt_instances):
        seen["anchors"] = anchors
        seen["labels"], seen["gt_boxes"] = label_anchors(anchors, gt_instances)
        return seen["labels"], seen["gt_boxes"]

    def record_detections(*args):
        seen["detections"] = detect(*args)
        return seen["detections"]

    model.label_anchors, model._detect_mask_proposals = record_labels, record_detections
    model.mask_head.register_forward_pre_hook(lambda m, args: seen.update(mask_rois=args[1]))
    model.box_reg_loss.register_forward_pre_hook(lambda m, args: seen.update(box_reg_args=args))
    # The EMA normaliser (momentum 0.9) divides this step by num_positives when it starts there.
    model.loss_normalizer.fill_(num_positives)
    model.train()
    model.zero_grad()
    with EventStorage():  # mask_rcnn_loss logs its accuracy
        losses = model(inputs)
        sum(losses.values()).backward()
    return model, losses, seen


def _check(name, ok, text):
    print(f"{name:<20} {'ok  ' if ok else 'MISS'}  {text}")
    return ok


def _note(name, text):
    print(f"{name:<20}       {text}")


# The head's last convolutions, whose output channels are (anchor, per-anchor values).
_HEAD_OUTPUTS = [f"head.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")]
# Parts of the network, by parameter name prefix (the first that matches).
_PARTS = {
    "resnet": "backbone.bottom_up.",
    "fpn": "backbone.",
    "class head": "head.cls_",
    "box head": "head.bbox_",
    "mask head": "mask_head.",
}


def gradient_cosines(model, ref_gradients, order):
    """
    Per parameter of ``model``, the cosine between its gradient and the reference's, mapped as
    the converter maps the weights (names, the head's anchor order, the mask predictor's
    background row); and the parameters with a gradient on one side only.
    """
    params = dict(model.named_parameters())
    cosines, unmatched = {}, []
    for ref_name, g in ref_gradients.items():
        name = _rename(ref_name)
        if name in _HEAD_OUTPUTS:
            g = g.unflatten(0, (len(order), -1))[order].flatten(0, 1)
        if name.startswith("mask_head.predictor."):
            g = g[1:]  # the reference's background class
        if name not in params or params[name].grad is None:
            unmatched.append(ref_name)
            continue
        a, b = params[name].grad.double().flatten(), g.double().flatten()
        norms = a.norm() * b.norm()
        cosines[name] = (a @ b / norms).item() if norms > 0 else float(torch.equal(a, b))
    unmatched += [n for n, p in params.items() if p.grad is not None and n not in cosines]
    return cosines, unmatched


def compare(cfg, model, losses, seen, ref) -> bool:
    """Print one line per check (per image for anchors); True when all meet their targets."""
    ok = True
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    num_sizes = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0])
    num_ratios = len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
    # As the converter's perm: detectron2's cell anchor (size s, ratio r) is s * R + r, the
    # reference's r * S + s.
    order = [r * num_sizes + s for s in range(num_sizes) for r in range(num_ratios)]
    counts = [len(a) for a in seen["anchors"]]
    sizes = [list(x.image_size) for x in seen["mask_rois"]]
    ok &= _check(
        "images and anchors",
        counts == ref["anchors_per_level"] and sizes == ref["image_sizes"],
        f"image sizes {sizes}, anchors per level {counts}; reference {ref['image_sizes']}, "
        f"{ref['anchors_per_level']}",
    )

    def ours(x):  # reference anchor order -> detectron2's
        levels = torch.split(x, ref["anchors_per_level"])
        return torch.cat([v.unflatten(0, (-1, len(order)))[:, order].flatten(0, 1) for v in levels])

    anchors = Boxes.cat(seen["anchors"]).tensor
    for i, (labels, gt_boxes) in enumerate(zip(seen["labels"], seen["gt_boxes"])):
        r = ours(ref["labels"][i])  # classes 1..K, 0 background, -1 ignored
        r = torch.where(r > 0, r - 1, torch.where(r == 0, num_classes, -1))
        pos, ref_pos = (labels >= 0) & (labels < num_classes), (r >= 0) & (r < num_classes)
        ok &= _check(
            f"anchor labels {i + 1}",
            torch.equal(labels, r),
            f"{int(pos.sum())} positive, {int((labels == -1).sum())} ignored (reference "
            f"{int(ref_pos.sum())}, {int((r == -1).sum())}); {int((labels != r).sum())} of "
            f"{len(r)} labels differ",
        )
        if not torch.equal(labels, r):
            ours_n, ref_n = (
                torch.bincount(x[p], minlength=num_classes)
                for x, p in ((labels, pos), (r, ref_pos))
            )
            differ = torch.nonzero(ours_n != ref_n).flatten().tolist()
            _note(
                "",
                "positive anchors per class (ours vs reference): "
                + ", ".join(f"class {c}: {ours_n[c]} vs {ref_n[c]}" for c in differ),
            )
        both = pos & ref_pos
        deltas = model.box2box_transform.get_deltas(anchors[both], gt_boxes[both])
        diff = (deltas - ours(ref["regression_targets"][i])[both]).abs().max().item()
        ok &= _check(
            f"box targets {i + 1}",
            diff <= 1e-4,
            f"max |difference| {diff:.1e} over {int(both.sum())} positive anchors (target 1e-4)",
        )

    for name in ("loss_cls", "loss_box_reg", "loss_mask"):
        a, b = losses[name].item(), ref["losses"][name]
        rel = abs(a - b) / abs(b)
        ok &= _check(name, rel <= 1e-4, f"{a:.7g} vs {b:.7g}, relative difference {rel:.1e}")
    for name in ("running_mean", "running_var"):
        a, b = getattr(model.box_reg_loss, name), ref["box_reg_stats"][name]
        rel = ((a - b).abs() / b.abs()).max().item()
        ok &= _check(
            f"box_reg {name}",
            rel <= 1e-5,
            f"{[round(v, 6) for v in a.tolist()]} vs {[round(v, 6) for v in b.tolist()]}, "
            f"relative difference {rel:.1e} (target 1e-5)",
        )

    cosines, unmatched = gradient_cosines(model, ref["gradients"], order)
    worst = sorted(cosines.items(), key=lambda kv: kv[1])
    low = [f"{n} {c:.6f}" for n, c in worst if c < 0.9999]
    ok &= _check(
        "gradients",
        not low and not unmatched,
        f"{len(cosines)} parameters, min cosine {worst[0][1]:.7f} ({worst[0][0]}); "
        f"{len(low)} below 0.9999{': ' + ', '.join(low[:6]) if low else ''}"
        f"{'; without a partner: ' + ', '.join(unmatched) if unmatched else ''}",
    )
    lowest = {}
    for name, c in cosines.items():
        part = next(p for p, prefix in _PARTS.items() if name.startswith(prefix))
        lowest[part] = min(c, lowest.get(part, 1.0))
    _note("", "min cosine by part: " + ", ".join(f"{p} {c:.7f}" for p, c in lowest.items()))

    # By design, not a check: one set of statistics from the batch of all processes, where
    # each process of the reference keeps its own (its loss is outside its model). Here: what a
    # process with one image of the batch would have ended with.
    loss, per_image = model.box_reg_loss, []
    for i in range(len(seen["labels"])):
        alone = SelfAdjustingSmoothL1Loss(
            beta_max=loss.beta_max, momentum=loss.momentum, min_beta=loss.min_beta
        ).train()
        alone(*(x[i : i + 1].detach() for x in seen["box_reg_args"]))
        per_image.append(alone.beta)
    _note(
        "statistics per process",
        f"beta after the step {[round(v, 5) for v in model.box_reg_loss.beta.tolist()]} from "
        "both images; from one image alone (one image per process, the reference's) "
        + ", ".join(str([round(v, 5) for v in b.tolist()]) for b in per_image),
    )

    # Not checks: where the mask RoIs come from, to find the cause of a loss_mask miss.
    for i, (dets, rois) in enumerate(zip(seen["detections"], seen["mask_rois"])):
        theirs = ref["detections"][i]
        boxes = theirs["boxes"] + theirs["boxes"].new_tensor([0, 0, 1, 1])  # inclusive x2, y2
        same = pairwise_iou(dets.pred_boxes, Boxes(boxes)) > 0.999
        same &= dets.pred_classes[:, None] == theirs["labels"][None, :] - 1
        _note(
            f"mask proposals {i + 1}",
            f"{len(dets)} detections, {int(same.any(1).sum())} of them among the reference's "
            f"{len(boxes)}; {len(rois)} mask RoIs (reference "
            f"{int((ref['mask_proposals'][i]['labels'] > 0).sum())})",
        )
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    batch = commands.add_parser("batch", help="write the batch both sides read")
    batch.add_argument("output", metavar="DIR")
    step = commands.add_parser("compare", help="run the step here and compare")
    step.add_argument("--config-file", required=True, help="e.g. configs/retinamask_R50.yaml")
    step.add_argument("--batch", required=True, metavar="DIR", help="written by the batch command")
    step.add_argument("--reference", required=True, metavar="FILE",
                      help="written by tools/original_reference.py train-step")  # fmt: skip
    step.add_argument("--original-weights", metavar="FILE",
                      help="the authors'-layout weights of the reference step, converted next to "
                      "--reference (else MODEL.WEIGHTS is a converted checkpoint)")  # fmt: skip
    step.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = parser.parse_args(argv)
    if args.command == "batch":
        write_batch(args.output)
        print(f"Wrote {len(_BATCH)} images and {BATCH_JSON} to {args.output}.")
        return 0

    with one_line_errors():
        for path, what in [
            (os.path.join(args.batch, BATCH_JSON), "--batch holds no batch: write it with `batch`"),
            (args.reference, "--reference does not exist: write it with original_reference.py"),
        ]:
            if not os.path.isfile(path):
                raise InputError(f"{what} ({path}).")
        cfg = get_retinamask_cfg(args.config_file, args.opts)
        cfg.MODEL.DEVICE = "cpu"
        if args.original_weights:
            name = os.path.splitext(os.path.basename(args.original_weights))[0]
            cfg.MODEL.WEIGHTS = os.path.join(os.path.dirname(args.reference), f"{name}_d2.pth")
            convert_original_file(cfg, args.original_weights, cfg.MODEL.WEIGHTS)
        ref = torch.load(args.reference, map_location="cpu", weights_only=True)
    num_positives = sum(int((x > 0).sum()) for x in ref["labels"])
    model, losses, seen = run_step(cfg, args.batch, num_positives)
    print(f"{args.config_file} with {cfg.MODEL.WEIGHTS} against {args.reference}:")
    ok = compare(cfg, model, losses, seen, ref)
    # By design, not a check: RetinaNet's EMA of the number of positive anchors divides the
    # losses; aligned in run_step by starting it at the reference's count.
    ema = 0.9 * 100 + 0.1 * num_positives
    images = len(ref["labels"]) if model.loss_cls_adds_images else 0
    _note(
        "EMA normaliser",
        f"started at the reference's {num_positives} positive anchors; from its initial 100, "
        f"this step's loss_box_reg would be x {num_positives / ema:.4f}, loss_cls x "
        f"{(num_positives + images) / (ema + images):.4f}",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

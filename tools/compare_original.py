#!/usr/bin/env python
"""
Compare a converted checkpoint, run by ``retinamask_d2.Predictor``, with what the authors' own
code gave on the same weights and images (``tools/original_reference.py detect``):

    python3 tools/compare_original.py --make-images DIR
    python3 tools/compare_original.py --config-file configs/original/retinamask_R50.yaml \
        --reference ref.json --images DIR [--output report.json] MODEL.WEIGHTS converted.pth

``--make-images`` writes the image set: scikit-image's bundled photographs, cropped and resized
to 14 sizes, among them sizes where flooring and rounding the resized long side differ, images
that the max-size rule shrinks (wide, tall, small), a square and a downscaled one.

``ref.json`` holds "images": per image, its "file" in DIR, the "input_size" [h, w] the authors'
code resized it to, and their detections box-only ("box_only") and with masks ("with_masks"),
as their COCO evaluation has them: "boxes" (x1, y1, x2, y2 in image pixels, their inclusive
x2, y2), "scores", "labels" (1-based) and, with masks, "masks" (COCO RLE of the pasted masks)
and "mask_probs" (base64 of their (N, 28, 28) float32 mask probabilities).

Each reference detection, highest score first, is paired with the free detection of ours of the
same class that overlaps it most (IoU >= 0.5). In the network's input their inclusive x2 + 1 is
our x2; scaled to the image, their x2 + (image width / input width) is ours. Targets: at least
99.5% of the reference detections paired, scores within 1e-4, every box coordinate within
0.01 pixels, and at least 99% of the reference masks at IoU 0.99 or more with ours. One line per
mode says how close it came, and two figures besides: how far the COCO boxes differ (their COCO
conversion adds its +1 after scaling to the image, detectron2's before; ours are converted as
the config's MODEL.RETINAMASK.COCO_BOXES says), and how many of their 28x28 masks, pasted with
their own boxes by this package, give exactly their pasted mask.
"""

import argparse
import base64
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, pairwise_iou

from retinamask_d2 import Predictor, get_retinamask_cfg
from retinamask_d2.conventions import reference_coco_boxes

SCORE_TOL, BOX_TOL, MASK_IOU = 1e-4, 0.01, 0.99
PAIRED_TARGET, MASK_TARGET = 0.995, 0.99

# (file, scikit-image sample, (height, width)): the sample is centre-cropped to the aspect
# ratio, then resized. At test size 800 / max 1333 the reference's input is, by its floor and
# max-size rule (detectron2's ResizeShortestEdge rounds):
IMAGES = [
    ("chelsea_300x451.png", "chelsea.png", (300, 451)),  # 800x1202 (1203)
    ("coins_303x384.png", "coins.png", (303, 384)),  # 800x1013 (1014)
    ("motorcycle_500x741.png", "motorcycle_left.png", (500, 741)),  # 800x1185 (1186)
    ("rocket_427x640.png", "rocket.jpg", (427, 640)),  # 800x1199
    ("coffee_400x600.png", "coffee.png", (400, 600)),  # 800x1200
    ("astronaut_512x512.png", "astronaut.png", (512, 512)),  # 800x800
    ("hubble_872x1000.png", "hubble_deep_field.jpg", (872, 1000)),  # 800x917
    ("camera_360x480.png", "camera.png", (360, 480)),  # 800x1066 (1067)
    ("astronaut_96x128.png", "astronaut.png", (96, 128)),  # 800x1066 (1067)
    ("coffee_451x300.png", "coffee.png", (451, 300)),  # 1202x800 (1203)
    ("motorcycle_400x1200.png", "motorcycle_right.png", (400, 1200)),  # 444x1332 (1333)
    ("coffee_300x1100.png", "coffee.png", (300, 1100)),  # 364x1334 (1333)
    ("rocket_64x200.png", "rocket.jpg", (64, 200)),  # 427x1334 (1333)
    ("hubble_640x256.png", "hubble_deep_field.jpg", (640, 256)),  # 1332x533 (1333)
]


def make_images(directory):
    """Write :data:`IMAGES` into ``directory`` as RGB PNG files."""
    import skimage.data  # only the samples its wheel ships, no download
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    samples = os.path.dirname(skimage.data.__file__)
    for file, sample, (h, w) in IMAGES:
        image = Image.open(os.path.join(samples, sample)).convert("RGB")
        crop_w = min(image.width, image.height * w // h)
        crop_h = min(image.height, image.width * h // w)
        left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((w, h), Image.BILINEAR)
        image.save(os.path.join(directory, file))


def mask_iou(a, b):
    """IoU of two boolean masks; two empty masks (a box too small to hold one) agree."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare(ref, boxes, scores, classes, masks=None, pixel=(1.0, 1.0), coco_boxes=None):
    """
    Pair the reference detections ``ref`` (one image, one mode of ref.json) with ours.

    Args:
        boxes (ndarray): (R, 4) our boxes, x1, y1, x2, y2 in image pixels.
        scores, classes (ndarray): (R,) our scores and 0-based classes.
        masks (ndarray or None): (R, H, W) our pasted masks, compared with ``ref["masks"]``.
        pixel (tuple[float, float]): width and height in image pixels of one pixel of the
            network's input: there, the reference's inclusive x2, y2 plus one are our x2, y2.
        coco_boxes (ndarray or None): (R, 4) the x1, y1, x2, y2 of our COCO results, if they
            are not ``boxes`` (MODEL.RETINAMASK.COCO_BOXES "reference").

    Returns:
        list[dict or None]: per reference detection, None if it has no partner, else its
        "score_diff", "box_diff" (largest of the four coordinates), "coco_box_diff" (the same
        for the COCO boxes: theirs (x1, y1, x2 - x1 + 1, y2 - y1 + 1), ours from
        ``coco_boxes``) and, with masks, "mask_iou".
    """
    coco_boxes = boxes if coco_boxes is None else coco_boxes
    ref_boxes = np.asarray(ref["boxes"], dtype=np.float64).reshape(-1, 4)
    ref_coco = ref_boxes + [0, 0, 1, 1]
    ref_boxes = ref_boxes + [0, 0, *pixel]
    iou = pairwise_iou(Boxes(torch.as_tensor(ref_boxes)), Boxes(torch.as_tensor(boxes)))
    iou[torch.as_tensor(ref["labels"]).view(-1, 1) - 1 != torch.as_tensor(classes)] = 0
    rows = [None] * len(ref_boxes)
    for i in np.argsort(-np.asarray(ref["scores"]), kind="stable") if len(boxes) else []:
        j = int(iou[i].argmax())
        if iou[i, j] < 0.5:
            continue
        iou[:, j] = 0  # taken
        rows[i] = {
            "score_diff": abs(ref["scores"][i] - float(scores[j])),
            "box_diff": float(np.abs(ref_boxes[i] - boxes[j]).max()),
            "coco_box_diff": float(np.abs(ref_coco[i] - coco_boxes[j]).max()),
        }
        if masks is not None:
            rows[i]["mask_iou"] = mask_iou(mask_util.decode(ref["masks"][i]), masks[j])
    return rows


def paste_alone(ref, input_size, height, width):
    """
    IoU of each mask pasted from the reference's own 28x28 probabilities and boxes by this
    package's reference paste (MODEL.RETINAMASK.MASK_PASTE "reference") with the reference's
    pasted mask: the paste checked apart from the network.
    """
    from retinamask_d2.conventions import ReferencePastedMasks

    n = len(ref["scores"])
    probs = np.frombuffer(base64.b64decode(ref["mask_probs"]), dtype="<f4").reshape(n, -1)
    side = int(round(probs.shape[1] ** 0.5))
    pixel = [width / input_size[1], height / input_size[0]]
    boxes = torch.as_tensor(ref["boxes"], dtype=torch.float32).view(-1, 4)
    boxes += torch.tensor([0.0, 0.0, *pixel])
    masks = ReferencePastedMasks(torch.as_tensor(probs.reshape(n, side, side)), input_size)
    pasted = masks.to_bitmasks(boxes, height, width).tensor.numpy()
    return [mask_iou(mask_util.decode(rle), m) for rle, m in zip(ref["masks"], pasted)]


def summarize(rows, paste_ious=()):
    """The figures of the targets over ``rows``, all images' :func:`compare` rows together."""
    pairs = [r for r in rows if r is not None]
    s = {
        "reference": len(rows),
        "paired": len(pairs),
        "max_score_diff": max((p["score_diff"] for p in pairs), default=0.0),
        "max_box_diff": max((p["box_diff"] for p in pairs), default=0.0),
        "boxes_off": sum(p["box_diff"] > BOX_TOL for p in pairs),
        "max_coco_box_diff": max((p["coco_box_diff"] for p in pairs), default=0.0),
    }
    ok = (
        s["paired"] >= PAIRED_TARGET * s["reference"]
        and s["max_score_diff"] <= SCORE_TOL
        and s["boxes_off"] == 0
    )
    if pairs and "mask_iou" in pairs[0]:
        s["masks_ok"] = sum(p["mask_iou"] >= MASK_IOU for p in pairs)
        s["mean_mask_iou"] = float(np.mean([p["mask_iou"] for p in pairs]))
        ok = ok and s["masks_ok"] >= MASK_TARGET * s["reference"]
    if len(paste_ious):
        s["paste_alone_identical"] = sum(iou == 1.0 for iou in paste_ious)
        s["paste_alone_min_iou"] = min(paste_ious)
    s["meets_targets"] = ok
    return s


def describe(s):
    """A summary in one line."""
    n = max(s["reference"], 1)
    line = f"{s['paired']}/{s['reference']} paired ({100 * s['paired'] / n:.2f}%)"
    line += f", max score diff {s['max_score_diff']:.1e}, max box diff {s['max_box_diff']:.4f} px"
    line += f" ({s['boxes_off']} boxes over {BOX_TOL})"
    if "masks_ok" in s:
        line += f", masks at IoU >= {MASK_IOU}: {s['masks_ok']}/{s['reference']}"
        line += f" ({100 * s['masks_ok'] / n:.2f}%, mean IoU {s['mean_mask_iou']:.4f})"
    line += ": meets the targets" if s["meets_targets"] else ": MISSES the targets"
    line += f"; COCO boxes differ by up to {s['max_coco_box_diff']:.3f} px"
    if "paste_alone_identical" in s:
        line += f"; their 28x28 masks pasted here: {s['paste_alone_identical']}/{s['reference']}"
        line += f" identical (min IoU {s['paste_alone_min_iou']:.4f})"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-images", metavar="DIR", help="write the image set and exit")
    parser.add_argument("--config-file", help="a configs/original/*.yaml file")
    parser.add_argument("--reference", help="JSON of the authors' detections")
    parser.add_argument("--images", help="directory of the images it names")
    parser.add_argument("--output", help="write the per-image comparison here (JSON)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = parser.parse_args(argv)
    if args.make_images:
        make_images(args.make_images)
        return 0
    if not (args.config_file and args.reference and args.images):
        parser.error("--config-file, --reference and --images are required")
    logging.basicConfig(level=logging.WARNING)

    cfg = get_retinamask_cfg(args.config_file, args.opts)
    name = os.path.basename(args.config_file)
    with open(args.reference) as f:
        reference = json.load(f)["images"]

    report = {}
    for mode, mask_on in (("box_only", False), ("with_masks", True)):
        cfg.MODEL.MASK_ON = mask_on
        predictor = Predictor(cfg)
        images = []
        for entry in reference:
            image = read_image(os.path.join(args.images, entry["file"]), format=cfg.INPUT.FORMAT)
            ours = predictor(image)["instances"].to("cpu")
            (h, w), (input_h, input_w) = image.shape[:2], entry["input_size"]
            resize = predictor.aug.get_transform(image)
            boxes = ours.pred_boxes.tensor
            if cfg.MODEL.RETINAMASK.COCO_BOXES == "reference":
                coco_boxes = reference_coco_boxes(boxes, (h, w), (resize.new_h, resize.new_w))
            else:
                coco_boxes = boxes
            rows = compare(
                entry[mode], boxes.numpy(), ours.scores.numpy(), ours.pred_classes.numpy(),
                ours.pred_masks.numpy() if mask_on else None, pixel=(w / input_w, h / input_h),
                coco_boxes=coco_boxes.numpy(),
            )  # fmt: skip
            paste = paste_alone(entry[mode], entry["input_size"], h, w) if mask_on else []
            same = entry["input_size"] == [resize.new_h, resize.new_w]
            images.append({"file": entry["file"], "same_input_size": same, "rows": rows,
                           "paste_alone": paste})  # fmt: skip
        summary = summarize(
            [r for i in images for r in i["rows"]], [p for i in images for p in i["paste_alone"]]
        )
        print(f"{name} {mode}, {len(images)} images: {describe(summary)}")
        other = [r for i in images if not i["same_input_size"] for r in i["rows"]]
        if other:
            same = [r for i in images if i["same_input_size"] for r in i["rows"]]
            print(f"  of which the images resized as the reference: {describe(summarize(same))}")
            print(f"  and the images resized otherwise: {describe(summarize(other))}")
        report[mode] = {"summary": summary, "images": images}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
Compare the detections of a converted checkpoint, run by detectron2's DefaultPredictor, with
the detections the authors' own code gave on the same weights and images:

    python3 tools/compare_original.py --config-file configs/original/retinamask_R50.yaml \
        --reference ref.json --images DIR --output report.json MODEL.WEIGHTS converted.pth

``ref.json`` holds "images": per image, its "file" in DIR, the "input_size" [h, w] the authors'
code resized it to, and their detections box-only ("box_only") and with masks ("with_masks"):
"boxes" as their code gives them (x1, y1, x2, y2 with inclusive x2, y2, in image pixels),
"scores", "labels" (1-based) and, with masks, "masks" as COCO RLE of the pasted masks.

A reference detection agrees when a detection of ours of the same class overlaps it at IoU
>= 0.5 (greedy, by score), with score difference <= 1e-3, every box coordinate within 1 pixel
(the authors' x2 + 1 is our x2) and, with masks, pasted-mask IoU >= 0.9.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, pairwise_iou

from retinamask_d2 import get_retinamask_cfg

SCORE_TOL, BOX_TOL, MASK_IOU = 1e-3, 1.0, 0.9


def compare(ref, ours, with_masks):
    """The counts and, per matched pair, the score, box and (with masks) mask differences."""
    # The authors' x2 + 1 is our x2.
    ref_boxes = np.asarray(ref["boxes"], dtype=np.float64).reshape(-1, 4) + [0, 0, 1, 1]
    our_boxes = ours.pred_boxes.tensor.cpu()
    iou = pairwise_iou(Boxes(torch.as_tensor(ref_boxes, dtype=torch.float32)), Boxes(our_boxes))
    iou[torch.as_tensor(ref["labels"]).view(-1, 1) - 1 != ours.pred_classes.cpu()] = 0
    rows = []
    # Greedy: each reference detection, highest score first, takes its best free match.
    for i in np.argsort(-np.asarray(ref["scores"]), kind="stable") if len(ours) else []:
        j = int(iou[i].argmax())
        if iou[i, j] < 0.5:
            continue
        iou[:, j] = 0  # taken
        ref_box, our_box = ref_boxes[i], our_boxes[j].numpy()
        row = {
            "area": float((ref_box[2] - ref_box[0]) * (ref_box[3] - ref_box[1])),
            "score_diff": abs(ref["scores"][i] - ours.scores[j].item()),
            "box_diff": float(np.abs(ref_box - our_box).max()),
            # COCO's box width: the authors' code writes x2 - x1 + 1, ours x2 - x1.
            "coco_width_diff": float((ref_box[2] - ref_box[0]) - (our_box[2] - our_box[0])),
        }
        if with_masks:
            masks = mask_util.decode(ref["masks"][i]).astype(bool), ours.pred_masks[j].cpu().numpy()
            union = np.logical_or(*masks).sum()
            # Two empty masks (a box too small to hold one) agree.
            row["mask_iou"] = float(np.logical_and(*masks).sum() / union) if union else 1.0
        ok = row["score_diff"] <= SCORE_TOL and row["box_diff"] <= BOX_TOL
        rows.append(dict(row, agrees=ok and row.get("mask_iou", 1.0) >= MASK_IOU))
    return {"reference": len(ref["scores"]), "ours": len(ours), "pairs": rows}


def summarize(results):
    pairs = [p for r in results for p in r["pairs"]]
    agreeing = sum(p["agrees"] for p in pairs)
    num_ref = sum(r["reference"] for r in results)
    summary = {
        "images": len(results),
        "reference_detections": num_ref,
        "our_detections": sum(r["ours"] for r in results),
        "matched": len(pairs),
        "agreeing": agreeing,
        "agreement": agreeing / max(num_ref, 1),
    }
    if pairs and "mask_iou" in pairs[0]:
        # Pasting differs most, in relative terms, for COCO's small objects (< 32 x 32 pixels).
        larger = [p for p in pairs if p["area"] >= 32 * 32]
        summary["mask_iou_ok"] = sum(p["mask_iou"] >= MASK_IOU for p in pairs)
        summary["matched_medium_large"] = len(larger)
        summary["mask_iou_ok_medium_large"] = sum(p["mask_iou"] >= MASK_IOU for p in larger)
    for key in ("score_diff", "box_diff", "coco_width_diff", "mask_iou"):
        values = [p[key] for p in pairs if key in p]
        if values:
            summary[key] = {f: float(getattr(np, f)(values)) for f in ("max", "mean", "min")}
    return summary


def describe(s):
    """A summary in one line: agreement, largest differences and, with masks, mask IoU."""
    line = f"{s['agreeing']}/{s['reference_detections']} reference detections agree"
    line += f" ({100 * s['agreement']:.1f}%)"
    if s["matched"]:
        line += f", max score diff {s['score_diff']['max']:.2e}"
        line += f", max box diff {s['box_diff']['max']:.3f} px"
    if "mask_iou" in s:
        line += f", mask IoU >= {MASK_IOU}: {s['mask_iou_ok']}/{s['matched']} (objects of 32x32"
        line += f" px or more: {s['mask_iou_ok_medium_large']}/{s['matched_medium_large']})"
        line += f", mean mask IoU {s['mask_iou']['mean']:.3f}"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--reference", required=True, help="JSON of the authors' detections")
    parser.add_argument("--images", required=True, help="directory of the images it names")
    parser.add_argument("--output", help="write the per-image comparison here (JSON)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = get_retinamask_cfg(args.config_file, args.opts)
    with open(args.reference) as f:
        reference = json.load(f)

    report = {}
    for mode, mask_on in (("box_only", False), ("with_masks", True)):
        cfg.MODEL.MASK_ON = mask_on
        predictor = DefaultPredictor(cfg)
        results = []
        for entry in reference["images"]:
            image = read_image(os.path.join(args.images, entry["file"]), format="BGR")
            result = compare(entry[mode], predictor(image)["instances"], mask_on)
            # The reference floors the resized long side where detectron2 rounds it.
            resize = predictor.aug.get_transform(image)
            same = list(entry["input_size"]) == [resize.new_h, resize.new_w]
            results.append({**result, "file": entry["file"], "same_input_size": same})
        report[mode] = {"all": summarize(results)}
        for group, same in (("same_input_size", True), ("other_input_size", False)):
            s = report[mode][group] = summarize(
                [r for r in results if r["same_input_size"] == same]
            )
            if s["images"]:
                print(f"{mode}, {s['images']} images of {group.replace('_', ' ')}: {describe(s)}")
        report[mode]["images"] = results
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

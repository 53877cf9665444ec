#!/usr/bin/env python
"""
Run the authors' code (chengyangfu/retinamask, a maskrcnn-benchmark fork) and write what it
gives to files that the comparison tools of this project read. Run it in the authors'
environment, from any directory, naming their checkout:

    python tools/original_reference.py --maskrcnn-benchmark /path/to/retinamask COMMAND ...

Commands (``COMMAND --help`` for their options):

- ``weights``: random weights for one of their configs (configs/retina/*.yaml), made to behave
  like trained ones at test time (frozen BatchNorm statistics calibrated on an image, hundreds
  of detections over their 0.05 threshold on each image of ``--images``, smooth masks), saved
  as their Checkpointer saves a model; ``tools/convert_original.py`` converts them.
- ``detect``: what their ``tools/test_net.py`` gives on each image of a directory, box-only and
  with masks, written to the JSON file that ``tools/compare_original.py`` reads.
- ``train-step``: one training step of their model on the batch that
  ``tools/compare_original_step.py batch`` writes, from given or seeded calibrated weights: its
  anchor labels, losses, loss statistics and gradients, for ``compare_original_step.py compare``.

retinamask_d2 itself never imports maskrcnn_benchmark: this script is the only place that
does, by the path given. Where the authors' compiled ops were not built (their build needs
PyTorch 1.0 and CUDA), it supplies them from torchvision, with the authors' conventions: NMS on
boxes with inclusive x2, y2 (+1 pixel), RoIAlign with aligned=False, and the sigmoid focal loss
in plain torch; and it fills in the few names that later PyTorch releases removed.
"""

import argparse
import base64
import contextlib
import functools
import importlib
import json
import os
import sys
import tempfile
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


def _their_config(config_file: str, opts=()):
    """The authors' config from one of their YAML files, on the CPU."""
    from maskrcnn_benchmark.config import cfg

    cfg = cfg.clone()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _their_input(cfg, image):
    """A PIL image as their test loader gives it to the model: an ImageList of one image."""
    from maskrcnn_benchmark.data.transforms import build_transforms
    from maskrcnn_benchmark.structures.bounding_box import BoxList
    from maskrcnn_benchmark.structures.image_list import to_image_list

    no_boxes = BoxList(torch.zeros(0, 4), image.size)  # their Resize also resizes the target
    tensor, _ = build_transforms(cfg, is_train=False)(image, no_boxes)
    return to_image_list(tensor, cfg.DATALOADER.SIZE_DIVISIBILITY)


def _images(directory):
    """(file name, RGB PIL image) of each .jpg and .png file in ``directory``, by name."""
    from PIL import Image

    names = sorted(os.listdir(directory)) if directory else []
    for name in (n for n in names if n.lower().endswith((".jpg", ".png"))):
        # As their COCO dataset reads images (torchvision's CocoDetection).
        yield name, Image.open(os.path.join(directory, name)).convert("RGB")


# ---------------------------------------------------------------------------------------------
# weights: random weights for the authors' model that behave like trained ones at test time.


def _calibration_image(seed: int):
    """A 480x640 image of smooth random colours with fine noise, the same for a seed."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(480, 640), mode="bicubic")[0]
    image = (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    return Image.fromarray((255 * image).permute(1, 2, 0).byte().numpy())


def _randomize(model, g):
    """
    Every parameter that the authors' initialisation leaves at a constant becomes random, so a
    wrong name or layout in the conversion shows. The head's convolutions keep the scale of their
    input (He initialisation), and the mask head's smooth its input: each 3x3 convolution is a
    random channel mix times a blur, the 2x2 up-convolution a random mix repeated on its 2x2
    output cells.
    """
    from maskrcnn_benchmark.layers import FrozenBatchNorm2d

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=g)

    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, torch.nn.GroupNorm)):
            module.weight.copy_(uniform(module.weight.shape, 0.5, 1.0))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        elif isinstance(module, convs) and module.bias is not None:
            module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))
    head = model.rpn.head
    for conv in [*head.cls_tower, *head.bbox_tower, head.cls_logits, head.bbox_pred]:
        if isinstance(conv, torch.nn.Conv2d):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
    if model.mask is not None:
        blur = torch.tensor([1.0, 2.0, 1.0])
        blur = (blur[:, None] * blur[None, :]) / 16
        extractor, predictor = model.mask.feature_extractor, model.mask.predictor
        for name in extractor.blocks:
            conv = getattr(extractor, name)
            mix = torch.randn(conv.weight.shape[:2], generator=g) * (2 / conv.in_channels) ** 0.5
            conv.weight.copy_(mix[:, :, None, None] * blur)
        up = predictor.conv5_mask
        mix = torch.randn(up.weight.shape[:2], generator=g) * (2 / up.in_channels) ** 0.5
        up.weight.copy_(mix[:, :, None, None].expand_as(up.weight))
        logits = predictor.mask_fcn_logits
        logits.weight.copy_(torch.randn(logits.weight.shape, generator=g))


def _calibrate_backbone(model, image):
    """
    On ``image``, in the order the network runs them: each frozen BatchNorm's statistics become
    the mean and variance of its input, so every normalised activation has unit scale; and the
    FPN outputs P3-P7 are scaled to standard deviations 1, 1.1, 1.21, ..., so that the larger
    anchors of the coarser levels reach the top detections too.
    """
    from maskrcnn_benchmark.layers import FrozenBatchNorm2d

    def normalize_input(module, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)
        module.running_mean.copy_(x.mean(1))
        module.running_var.copy_(x.var(1) + 1e-5)

    def scale_output(module, inputs, output, std):
        last = module[-1] if isinstance(module, torch.nn.Sequential) else module  # conv or norm
        scale = std / output.std()
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        return output * scale

    fpn = model.backbone.fpn
    outputs = [getattr(fpn, name) for name in fpn.layer_blocks]
    outputs += [fpn.top_blocks.p6, fpn.top_blocks.p7]
    hooks = [m.register_forward_pre_hook(normalize_input)
             for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]  # fmt: skip
    for level, module in enumerate(outputs):
        hooks.append(module.register_forward_hook(functools.partial(scale_output, std=1.1**level)))
    model.backbone(image.tensors)
    for hook in hooks:
        hook.remove()


def _calibrate_heads(model, images, calibration, candidates=300, max_logit=6.0):
    """
    Scale and shift the class logits so that every image of ``images`` has at least
    ``candidates`` (anchor, class) pairs over the reference's 0.05 score threshold and none
    above a logit of ``max_logit`` (a score that cannot round to 1): the scale of every activation
    follows the contrast of the image, up to 4x over natural photographs. On the image
    ``calibration``: box deltas with a standard deviation of 0.3, and mask logits with 1.5
    around 0, so that masks cover about half of their boxes.
    """
    head = model.rpn.head
    head.cls_logits.bias.zero_()
    head.bbox_pred.bias.zero_()
    lowest_kth, highest = float("inf"), -float("inf")
    for batch in images:
        logits = torch.cat([x.flatten() for x in head(model.backbone(batch.tensors))[0]])
        lowest_kth = min(lowest_kth, float(logits.topk(candidates).values[-1]))
        highest = max(highest, float(logits.max()))
    threshold = float(torch.logit(torch.tensor(0.05)))
    scale = (max_logit - threshold) / (highest - lowest_kth)
    head.cls_logits.weight.mul_(scale)
    head.cls_logits.bias.fill_(threshold - scale * lowest_kth)
    deltas = head(model.backbone(calibration.tensors))[1]
    head.bbox_pred.weight.mul_(0.3 / torch.cat([x.flatten() for x in deltas]).std())

    if model.mask is not None:
        predictor = model.mask.predictor.mask_fcn_logits
        predictor.bias.zero_()
        outputs = []
        hook = model.mask.predictor.register_forward_hook(lambda m, i, o: outputs.append(o))
        model(calibration)
        hook.remove()
        predictor.weight.mul_(1.5 / outputs[0].std())
        predictor.bias.fill_(-float(outputs[0].median() * 1.5 / outputs[0].std()))


def weights(args):
    """Random weights for the authors' model, saved as their Checkpointer saves them."""
    from maskrcnn_benchmark.modeling.detector import build_detection_model

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = _their_config(args.config_file, ["MODEL.MASK_ON", True])
    model = build_detection_model(cfg).eval()
    calibration = _their_input(cfg, _calibration_image(args.seed))
    images = [_their_input(cfg, image) for _, image in _images(args.images)] or [calibration]
    with torch.no_grad():
        _randomize(model, g)
        _calibrate_backbone(model, calibration)
        _calibrate_heads(model, images, calibration)
    torch.save({"model": model.state_dict()}, args.output)
    print(f"Wrote random calibrated weights for {args.config_file} to {args.output}.")


# ---------------------------------------------------------------------------------------------
# detect: what their tools/test_net.py gives, per image, in the image's own pixels.


@contextlib.contextmanager
def _cuda_placeholders_on_cpu():
    """
    Their post-processor puts the placeholder detection of an image without any on "cuda"
    (rpn/retinanet_infer.py); without CUDA it stays where the other tensors are.
    """
    to = torch.Tensor.to

    def to_unless_cuda(tensor, *args, **kwargs):
        return tensor if args[:1] == ("cuda",) else to(tensor, *args, **kwargs)

    torch.Tensor.to = to_unless_cuda
    try:
        yield
    finally:
        torch.Tensor.to = to


def _coco_ready(prediction, width, height):
    """
    A prediction as their COCO evaluation (engine/inference.py) turns it into results: the
    BoxList resized to the image, masks pasted by their Masker and encoded as RLE.
    """
    import pycocotools.mask as mask_util
    from maskrcnn_benchmark.modeling.roi_heads.mask_head.inference import Masker

    prediction = prediction.resize((width, height))
    result = {
        # x1, y1, x2, y2 with their inclusive x2, y2; their COCO "bbox" is
        # (x1, y1, x2 - x1 + 1, y2 - y1 + 1).
        "boxes": prediction.bbox.tolist(),
        "scores": prediction.get_field("scores").tolist(),
        "labels": prediction.get_field("labels").tolist(),  # 1..80
    }
    if prediction.has_field("mask"):
        probs = prediction.get_field("mask")  # (N, 1, 28, 28)
        masks = Masker(threshold=0.5, padding=1)(probs, prediction)
        rles = [mask_util.encode(np.array(m[0, :, :, None], order="F"))[0] for m in masks]
        result["masks"] = [dict(rle, counts=rle["counts"].decode()) for rle in rles]
        # Their 28x28 probabilities, so the paste can be checked apart from the network.
        result["mask_probs"] = base64.b64encode(probs.numpy().astype("<f4").tobytes()).decode()
    return result


def detect(args):
    """Their detections on each image of a directory, box-only and with masks, to a JSON file."""
    from maskrcnn_benchmark.modeling.detector import build_detection_model
    from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer

    cfg = _their_config(args.config_file, ["MODEL.MASK_ON", True])
    model = build_detection_model(cfg).eval()
    with tempfile.TemporaryDirectory() as empty:
        # Their loader prefers the file named in a last_checkpoint file of save_dir, if any.
        DetectronCheckpointer(cfg, model, save_dir=empty).load(args.weights)
    # With MASK_ON False their RetinaNet returns its RetinaNet module's detections as they are;
    # with masks, its top NUM_MASKS_TEST of them with a "mask" field.
    box_only = []
    model.rpn.register_forward_hook(lambda module, inputs, output: box_only.append(output[0][1]))
    images = []
    for file, image in _images(args.images):
        batch = _their_input(cfg, image)
        box_only.clear()
        with torch.no_grad(), _cuda_placeholders_on_cpu():
            (with_masks,) = model(batch)
        (h, w), (width, height) = batch.image_sizes[0], image.size
        images.append({
            "file": file,
            "input_size": [int(h), int(w)],
            "box_only": _coco_ready(box_only[0][0], width, height),
            "with_masks": _coco_ready(with_masks, width, height),
        })  # fmt: skip
        print(f"{file}: {width}x{height} -> {w}x{h}, {len(box_only[0][0])} detections")
    with open(args.output, "w") as f:
        json.dump({"config_file": args.config_file, "images": images}, f)


# ---------------------------------------------------------------------------------------------
# train-step: one training step of the authors' model on a given batch.


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

    p = commands.add_parser("weights", help=weights.__doc__)
    p.add_argument("--config-file", required=True, help="their configs/retina/*.yaml")
    p.add_argument("--output", required=True, help="checkpoint to write (.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", help="calibrate the class scores on the images of this directory")
    p.set_defaults(run=weights)

    p = commands.add_parser("detect", help=detect.__doc__)
    p.add_argument("--config-file", required=True, help="their configs/retina/*.yaml")
    p.add_argument("--weights", required=True, help="a checkpoint of their model")
    p.add_argument("--images", required=True, help="directory of .jpg/.png images")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.set_defaults(run=detect)

    p = commands.add_parser("train-step", help=train_step.__doc__)
    p.add_argument("--config-file", required=True, help="their configs/retina/*.yaml")
    p.add_argument("--batch", required=True, metavar="DIR",
                   help="written by tools/compare_original_step.py batch")  # fmt: skip
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--weights", metavar="FILE", help="a checkpoint of their model")
    init.add_argument("--init-weights", metavar="OUT",
                      help="write seeded random weights, calibrated on the batch, and use them")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, metavar="FILE", help="what the step gave (.pth)")
    p.set_defaults(run=train_step)

    args = parser.parse_args(argv)
    load_maskrcnn_benchmark(args.maskrcnn_benchmark)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

from detectron2.utils.registry import Registry

__all__ = [
    "ANCHOR_MATCHER_REGISTRY",
    "BOX_REG_LOSS_REGISTRY",
    "build_anchor_matcher",
    "build_box_reg_loss",
]

ANCHOR_MATCHER_REGISTRY = Registry("ANCHOR_MATCHER")
ANCHOR_MATCHER_REGISTRY.__doc__ = """
Registry for anchor matchers, which label anchors by their IoU with the ground truth.
The registered object is called with a config and must behave like
:class:`detectron2.modeling.matcher.Matcher`: same call signature, same return values.
"""

BOX_REG_LOSS_REGISTRY = Registry("BOX_REG_LOSS")
BOX_REG_LOSS_REGISTRY.__doc__ = """
Registry for box regression losses. The registered object is called with a config and returns
an ``nn.Module`` whose forward takes ``(pred_deltas, gt_deltas, fg_mask)`` and returns the loss
summed over the foreground elements.
"""


def _build(registry: Registry, component: str, cfg):
    name = cfg.MODEL.RETINAMASK[component].NAME
    # Registry.get's own KeyError names the registry but not the config key, nor what exists.
    if name not in registry:
        raise KeyError(
            f"MODEL.RETINAMASK.{component}.NAME = {name!r} is not registered; registered names "
            f"are: {', '.join(sorted(k for k, _ in registry))}. Fix the spelling in the config, "
            f"or import the module that registers {name!r} before building the model."
        )
    return registry.get(name)(cfg)


def build_anchor_matcher(cfg):
    """Build the anchor matcher named by ``cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.NAME``."""
    return _build(ANCHOR_MATCHER_REGISTRY, "ANCHOR_MATCHER", cfg)


def build_box_reg_loss(cfg):
    """Build the box regression loss named by ``cfg.MODEL.RETINAMASK.BOX_REG_LOSS.NAME``."""
    return _build(BOX_REG_LOSS_REGISTRY, "BOX_REG_LOSS", cfg)

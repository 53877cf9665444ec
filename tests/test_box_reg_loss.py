import math
import os
import tempfile

import pytest
import torch

from detectron2.engine import launch
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from retinamask_d2 import (
    SelfAdjustingSmoothL1Loss,
    SmoothL1Loss,
    get_retinamask_cfg,
    build_box_reg_loss,
)
from retinamask_d2.engine import leaves_process_group


def _eq2_reference(batches, beta_max=0.11, momentum=0.9, min_beta=1e-3):
    """
    Eq. 2 of the paper with plain Python floats, one coordinate at a time, with the reference's
    unbiased batch variance and no update from fewer than two elements. ``batches`` is a list
    of lists of per-element rows of |x| (one row of 4 per foreground element).
    Returns the beta used at each step.
    """
    mean = [beta_max] * 4
    var = [0.0] * 4
    betas = []
    for rows in batches:
        if len(rows) >= 2:
            for c in range(4):
                col = [r[c] for r in rows]
                mu_b = sum(col) / len(col)
                var_b = sum((v - mu_b) ** 2 for v in col) / (len(col) - 1)
                mean[c] = mean[c] * momentum + mu_b * (1 - momentum)
                var[c] = var[c] * momentum + var_b * (1 - momentum)
        betas.append([min(beta_max, max(min_beta, m - v)) for m, v in zip(mean, var)])
    return betas


def _smooth_l1(x, beta):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_first_step_worked_by_hand():
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    pred = torch.tensor([[0.02, 0.3, 0.05, 0.5], [0.04, 0.1, 0.05, 0.7]])
    target = torch.zeros_like(pred)
    loss = loss_fn(pred, target, torch.tensor([True, True]))
    # mu_B = [0.03, 0.2, 0.05, 0.6], unbiased sigma_B^2 = [2e-4, 2e-2, 0, 2e-2]
    # mu_R = 0.9 * 0.11 + 0.1 * mu_B = [0.102, 0.119, 0.104, 0.159]
    # sigma_R^2 = 0.1 * sigma_B^2 = [2e-5, 2e-3, 0, 2e-3]
    # beta = clamp(mu_R - sigma_R^2, 1e-3, 0.11) = [0.10198, 0.11, 0.104, 0.11]
    expected_beta = torch.tensor([0.10198, 0.11, 0.104, 0.11])
    torch.testing.assert_close(loss_fn.running_mean, torch.tensor([0.102, 0.119, 0.104, 0.159]))
    torch.testing.assert_close(loss_fn.running_var, torch.tensor([2e-5, 2e-3, 0.0, 2e-3]))
    torch.testing.assert_close(loss_fn.beta, expected_beta)
    expected = sum(
        _smooth_l1(pred[i, c].item(), expected_beta[c].item()) for i in range(2) for c in range(4)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_beta_trajectory_over_several_steps():
    torch.manual_seed(0)
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    batches = []
    for step in range(6):
        n = 3 + step
        pred = torch.randn(2, n, 4) * (0.2 / (step + 1))
        target = torch.randn(2, n, 4) * 0.01
        fg = torch.rand(2, n) > 0.3
        fg[0, 0] = True
        loss = loss_fn(pred, target, fg)
        rows = (pred - target).abs()[fg].tolist()
        batches.append(rows)
        beta = _eq2_reference(batches)[-1]
        torch.testing.assert_close(loss_fn.beta, torch.tensor(beta), rtol=1e-5, atol=1e-7)
        expected = sum(_smooth_l1(v, beta[c]) for r in rows for c, v in enumerate(r))
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_beta_clamped_at_both_ends():
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    # Large residuals with a large spread drive mu_R - sigma_R^2 below zero: lower bound.
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    loss_fn(pred, torch.zeros_like(pred), torch.tensor([True, True]))
    # mu_R = 0.099 + 0.1 * 2 = 0.299, sigma_R^2 = 0.1 * 8 = 0.8: beta = max(1e-3, -0.501)
    torch.testing.assert_close(loss_fn.beta, torch.full((4,), 1e-3))

    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    # Constant residual of 1: mu_R grows above beta_max with zero variance: upper bound.
    pred = torch.ones(5, 4)
    loss_fn(pred, torch.zeros_like(pred), torch.ones(5, dtype=torch.bool))
    assert torch.all(loss_fn.running_mean - loss_fn.running_var > 0.11)
    torch.testing.assert_close(loss_fn.beta, torch.full((4,), 0.11))


def test_batch_without_foreground_keeps_statistics_and_gives_zero():
    loss_fn = SelfAdjustingSmoothL1Loss().train()
    warm = torch.full((3, 4), 0.05)
    loss_fn(warm, torch.zeros_like(warm), torch.ones(3, dtype=torch.bool))
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}

    pred = torch.randn(2, 7, 4, requires_grad=True)
    # Background targets of an image without objects are infinite (log of zero width).
    target = torch.full((2, 7, 4), -math.inf)
    loss = loss_fn(pred, target, torch.zeros(2, 7, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()
    for k, v in loss_fn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_variance_is_unbiased_over_foreground_elements():
    torch.manual_seed(0)
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    pred, target = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    fg = torch.tensor([[True, False, True], [True, True, False]])
    loss_fn(pred, target, fg)
    x = (pred - target).abs()[fg]  # (4, 4)
    torch.testing.assert_close(loss_fn.running_var, 0.1 * torch.var(x, dim=0, unbiased=True))
    torch.testing.assert_close(loss_fn.running_mean, 0.099 + 0.1 * x.mean(dim=0))


def test_single_foreground_element_leaves_statistics():
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11, momentum=0.9).train()
    warm = torch.tensor([[0.02, 0.3, 0.05, 0.5], [0.04, 0.1, 0.05, 0.7]])
    loss_fn(warm, torch.zeros_like(warm), torch.tensor([True, True]))
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}

    pred = torch.tensor([[[0.03, -0.2, 0.0, 0.5], [9.0, 9.0, 9.0, 9.0]]])
    fg = torch.tensor([[True, False]])
    loss = loss_fn(pred, torch.zeros_like(pred), fg)
    # One element has no unbiased variance: the reference skips its update, and so does this.
    for k, v in loss_fn.state_dict().items():
        assert torch.equal(v, state[k]), k
    beta = loss_fn.beta.tolist()
    expected = sum(_smooth_l1(v, b) for v, b in zip([0.03, -0.2, 0.0, 0.5], beta))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients():
    loss_fn = SelfAdjustingSmoothL1Loss(beta_max=0.11).eval()  # beta stays at 0.11
    pred = torch.tensor([[0.05, -0.05, 0.5, -0.5], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    fg = torch.tensor([True, False])
    loss_fn(pred, torch.zeros_like(pred), fg).backward()
    # Quadratic branch: x / beta; linear branch: sign(x); background: 0.
    expected = torch.tensor([[0.05 / 0.11, -0.05 / 0.11, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(pred.grad, expected)


def test_eval_mode_does_not_update_statistics():
    loss_fn = SelfAdjustingSmoothL1Loss().eval()
    pred = torch.rand(4, 4)
    loss_fn(pred, torch.zeros_like(pred), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(loss_fn.running_mean, torch.full((4,), 0.11))
    torch.testing.assert_close(loss_fn.running_var, torch.zeros(4))


def test_statistics_are_checkpointed_and_restored():
    loss_fn = SelfAdjustingSmoothL1Loss().train()
    for _ in range(3):
        pred = torch.rand(6, 4) * 0.1
        loss_fn(pred, torch.zeros_like(pred), torch.ones(6, dtype=torch.bool))
    state = loss_fn.state_dict()
    assert set(state) == {"running_mean", "running_var"}

    restored = SelfAdjustingSmoothL1Loss()
    assert not torch.equal(restored.beta, loss_fn.beta)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(restored.state_dict()[name], state[name])
    assert torch.equal(restored.beta, loss_fn.beta)


def test_fixed_beta_loss_equals_detectron2_smooth_l1():
    torch.manual_seed(0)
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    xy = torch.rand(20, 2) * 50
    anchors = [Boxes(torch.cat([xy, xy + 5 + torch.rand(20, 2) * 30], dim=1))]
    gt_xy = torch.rand(2, 20, 2) * 50
    gt_boxes = torch.cat([gt_xy, gt_xy + 5 + torch.rand(2, 20, 2) * 30], dim=2)
    pred = [torch.randn(2, 20, 4) * 0.3]
    fg = torch.rand(2, 20) > 0.5
    expected = _dense_box_regression_loss(
        anchors, transform, pred, list(gt_boxes), fg, "smooth_l1", smooth_l1_beta=0.11
    )
    gt_deltas = torch.stack([transform.get_deltas(anchors[0].tensor, g) for g in gt_boxes])
    actual = SmoothL1Loss(beta=0.11)(pred[0], gt_deltas, fg)
    torch.testing.assert_close(actual, expected)


def test_built_from_config():
    cfg = get_retinamask_cfg()
    cfg.MODEL.RETINAMASK.BOX_REG_LOSS.BETA = 0.2
    cfg.MODEL.RETINAMASK.BOX_REG_LOSS.MOMENTUM = 0.5
    loss_fn = build_box_reg_loss(cfg)
    assert isinstance(loss_fn, SelfAdjustingSmoothL1Loss)
    assert (loss_fn.beta_max, loss_fn.momentum) == (0.2, 0.5)
    cfg.MODEL.RETINAMASK.BOX_REG_LOSS.NAME = "SmoothL1Loss"
    assert build_box_reg_loss(cfg).beta == 0.2
    cfg.MODEL.RETINAMASK.BOX_REG_LOSS.NAME = "SelfAdjustingSmoothL1"
    with pytest.raises(KeyError, match="SelfAdjustingSmoothL1Loss, SmoothL1Loss"):
        build_box_reg_loss(cfg)


def test_beta_is_published_to_event_storage():
    loss_fn = SelfAdjustingSmoothL1Loss().train()
    pred = torch.tensor([[0.02, 0.3, 0.05, 0.5], [0.04, 0.1, 0.05, 0.7]])
    fg = torch.tensor([True, True])
    with EventStorage(start_iter=0) as storage:
        loss_fn(pred, torch.zeros_like(pred), fg)
        after_first = {
            "beta": loss_fn.beta.clone(),
            "mean": loss_fn.running_mean.clone(),
            "var": loss_fn.running_var.clone(),
        }
        storage.iter = 1
        loss_fn(pred, torch.zeros_like(pred), fg)
        # Iteration 1 starts with the statistics and beta that iteration 0 ended with.
        for stat, expected in after_first.items():
            for c, name in enumerate(["dx", "dy", "dw", "dh"]):
                value, it = storage.latest()[f"box_reg_{stat}/{name}"]
                assert it == 1
                assert value == pytest.approx(expected[c].item())
    # Not the initial values: the logged ones moved.
    assert not torch.equal(after_first["mean"], torch.full((4,), 0.11))
    assert after_first["var"].abs().sum() > 0


def _distributed_worker(out_dir, batches):
    from detectron2.utils import comm

    rank = comm.get_rank()
    loss_fn = SelfAdjustingSmoothL1Loss().train()
    for pred, fg in batches:
        loss_fn(pred[rank], torch.zeros_like(pred[rank]), fg[rank])
    torch.save(loss_fn.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))


def test_statistics_are_averaged_across_processes(dist_url):
    torch.manual_seed(0)
    # Two processes see different halves of each batch, with different foreground counts.
    batches = []
    for _ in range(3):
        pred = torch.rand(2, 5, 4) * 0.3
        fg = torch.rand(2, 5) > 0.4
        fg[:, 0] = True
        batches.append((pred, fg))
    single = SelfAdjustingSmoothL1Loss().train()
    for pred, fg in batches:
        single(pred, torch.zeros_like(pred), fg)

    with tempfile.TemporaryDirectory() as out_dir:
        launch(
            leaves_process_group(_distributed_worker),
            num_gpus_per_machine=2,
            dist_url=dist_url,
            args=(out_dir, batches),
        )
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pth")) for r in range(2)]
    for state in states:
        torch.testing.assert_close(state["running_mean"], single.running_mean)
        torch.testing.assert_close(state["running_var"], single.running_var)

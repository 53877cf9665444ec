import importlib.util
import json
import os

import pytest

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "plot_beta", os.path.join(REPO_ROOT, "tools", "plot_beta.py")
)
plot_beta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_beta)


def _write_metrics(path, iterations):
    lines = []
    for it in iterations:
        record = {"iteration": it, "total_loss": 1.0}
        for c, scale in zip(plot_beta.COORDS, (1, 2, 3, 4)):
            mean = 0.11 / (1 + it / 100) / scale
            record[f"box_reg_mean/{c}"] = mean
            record[f"box_reg_var/{c}"] = mean / 10
            record[f"box_reg_beta/{c}"] = mean - mean / 10
        lines.append(json.dumps(record))
    # The evaluation record, and a line cut short by an interrupted run.
    lines += [json.dumps({"iteration": iterations[-1], "bbox/AP": 1.0}), '{"iteration": 9']
    path.write_text("\n".join(lines))


def test_plot_writes_a_png(tmp_path):
    metrics = tmp_path / "run" / "metrics.json"
    metrics.parent.mkdir()
    # 59 twice: a run resumed from its checkpoint at 59 logs it again.
    _write_metrics(metrics, [19, 39, 59, 59, 79])
    curves = plot_beta.read_curves(str(metrics))
    iterations, values = curves["beta"]["dw"]
    assert iterations == (19, 39, 59, 79)
    assert values[0] == pytest.approx(0.11 / 1.19 / 3 * 0.9)

    output = tmp_path / "plots" / "beta.png"
    plot_beta.main(plot_beta.parse_args([str(metrics), "--output", str(output)]))
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.stat().st_size > 10_000


def test_run_without_the_statistics_is_a_clear_error(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iteration": 19, "total_loss": 1.0}))
    with pytest.raises(ValueError, match="SelfAdjustingSmoothL1Loss"):
        plot_beta.read_curves(str(metrics))

"""
README.md's predictor snippet runs as written, right after the quick start.
"""

import os
import re
import subprocess
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, REPO_ROOT, load_config
from retinamask_d2.data import ensure_synthetic_dataset


def _python_snippet(section):
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    start = readme.index(f"## {section}\n")
    return re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)


def test_predictor_snippet_runs_after_the_quick_start(tmp_path):
    # What the quick start leaves in the working directory: the dataset and the trained model
    # (untrained weights here; the snippet only needs the file).
    os.symlink(CONFIG_DIR, tmp_path / "configs")
    ensure_synthetic_dataset("val", str(tmp_path / "datasets"))
    os.makedirs(tmp_path / "output" / "synthetic_retinamask")
    model = build_model(load_config(os.path.join("synthetic", "retinamask_synthetic.yaml")))
    DetectionCheckpointer(model, str(tmp_path / "output" / "synthetic_retinamask")).save(
        "model_final"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", _python_snippet("Use")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "detections, best scores:" in result.stdout

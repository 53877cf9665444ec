"""
AtomicDetectionCheckpointer: files written whole with the usual permissions, clear errors for
MODEL.WEIGHTS that is not a checkpoint, and resuming past a damaged last_checkpoint.
"""

import logging
import os
import stat

import pytest
import torch

from retinamask_d2.checkpoint import AtomicDetectionCheckpointer, write_atomically
from retinamask_d2.config import InputError


@pytest.fixture(autouse=True)
def checkpointer_logs_reach_caplog(monkeypatch):
    # detectron2's setup_logger, which train_net.setup runs (also in this process, in other
    # tests), stops "fvcore", the parent of the checkpointer's logger, from propagating to the
    # root logger that caplog listens on.
    monkeypatch.setattr(logging.getLogger("fvcore"), "propagate", True)


def _model(value=0.0):
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def _save(directory, name, value):
    directory.mkdir(exist_ok=True)
    AtomicDetectionCheckpointer(_model(value), str(directory)).save(name, iteration=int(value))
    return directory / f"{name}.pth"


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_has_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain").write_text("x")
    write_atomically(str(tmp_path / "atomic"), "w", lambda f: f.write("x"))
    assert (tmp_path / "atomic").read_text() == "x"
    assert _mode(tmp_path / "atomic") == _mode(tmp_path / "plain")


def test_failed_write_keeps_old_contents_and_no_temporary_file(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(str(target), "wb", write)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["target"]


@pytest.mark.parametrize(
    "contents", [b"MODEL:\n  WEIGHTS: foo\n", None], ids=["text file", "truncated file"]
)
def test_loading_a_file_that_is_not_a_checkpoint_names_it_and_the_fix(tmp_path, contents):
    path = tmp_path / "weights.pth"
    if contents is None:
        data = _save(tmp_path, "full", 1.0).read_bytes()
        contents = data[: len(data) // 2]
    path.write_bytes(contents)
    with pytest.raises(InputError, match="not a readable checkpoint.*Set MODEL.WEIGHTS") as e:
        AtomicDetectionCheckpointer(_model()).load(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_loading_a_missing_file_names_it_and_the_fix(tmp_path):
    path = str(tmp_path / "model_final.pth")
    with pytest.raises(InputError, match="no such file. Set MODEL.WEIGHTS") as e:
        AtomicDetectionCheckpointer(_model()).load(path)
    assert path in str(e.value)


def test_resume_from_an_intact_last_checkpoint(tmp_path, caplog):
    _save(tmp_path, "model_0000001", 1.0)
    _save(tmp_path, "model_0000002", 2.0)
    model = _model()
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 2 and torch.all(model.weight == 2.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "last_checkpoint",
    [b"\x80\xff\xfe\x00garbage", b"model_0000009.pth", b"model_0000003.pth"],
    ids=["garbage", "missing file", "truncated file"],
)
def test_resume_past_a_bad_last_checkpoint_uses_the_newest_complete_one(
    tmp_path, caplog, last_checkpoint
):
    _save(tmp_path, "model_0000001", 1.0)
    newest = _save(tmp_path, "model_0000002", 2.0)
    os.utime(tmp_path / "model_0000001.pth", (0, 0))  # older, whatever the clock's resolution
    data = newest.read_bytes()
    (tmp_path / "model_0000003.pth").write_bytes(data[: len(data) - 100])
    (tmp_path / "last_checkpoint").write_bytes(last_checkpoint)

    model = _model()
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 2 and torch.all(model.weight == 2.0)
    assert checkpointer.has_checkpoint()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "resuming from the newest complete" in warnings[0]
    assert str(newest) in warnings[0]


def test_resume_without_a_complete_checkpoint_starts_from_the_weights(tmp_path, caplog):
    weights = _save(tmp_path / "pretrained", "weights", 5.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000009.pth")
    (out / "model_0000004.pth").write_bytes(b"truncated")

    model = _model()
    checkpointer = AtomicDetectionCheckpointer(model, str(out))
    with caplog.at_level(logging.WARNING):
        checkpointer.resume_or_load(str(weights), resume=True)
    assert torch.all(model.weight == 5.0)
    # DefaultTrainer starts at iteration 0 only when this is False.
    assert not checkpointer.has_checkpoint()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "starts from MODEL.WEIGHTS" in warnings[0]

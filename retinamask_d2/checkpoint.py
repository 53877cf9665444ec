"""
A checkpointer whose files are complete whenever they exist, so that training killed at any
moment (SIGKILL or power loss, also mid-save) resumes from the last complete checkpoint, and
whose loads fail with one line naming the file and the fix.
"""

import contextlib
import glob
import logging
import os
import re
import uuid
import zipfile

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n

from .config import InputError

__all__ = [
    "AtomicDetectionCheckpointer",
    "check_weights_exist",
    "load_error_reason",
    "write_atomically",
]


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` that writes ``<name>.pth``, then ``last_checkpoint``, each
    with :func:`write_atomically`; fvcore writes both in place, so a killed save that overwrites
    a name (``model_final.pth`` of an earlier run) leaves ``last_checkpoint`` naming a truncated
    file. ``save_dir`` must be a local directory, as ``cfg.OUTPUT_DIR`` normally is.

    A ``last_checkpoint`` that is garbage or names a missing or incomplete file resumes from the
    newest complete ``model_*.pth``, else from the weights given to :meth:`resume_or_load`, with
    one warning. A file that is not a checkpoint fails to load with an :class:`InputError`.
    """

    def save(self, name: str, **kwargs) -> None:
        """Same arguments and file contents as fvcore's :meth:`Checkpointer.save`."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        # Only the main process saves here: a temporary file found was left by a killed save.
        for partial in glob.glob(os.path.join(glob.escape(self.save_dir), ".*.partial")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {save_file}")
        write_atomically(save_file, "wb", lambda f: torch.save(data, f))
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        write_atomically(save_file, "w", lambda f: f.write(last_filename_basename))

    def has_checkpoint(self) -> bool:
        """
        Returns:
            bool: whether :meth:`get_checkpoint_file` finds a complete checkpoint to resume from.
        """
        return bool(self.get_checkpoint_file())

    def get_checkpoint_file(self) -> str:
        """
        Returns:
            str: the file ``last_checkpoint`` names when it is complete; else, with a warning,
            the newest complete ``model_*.pth`` in ``save_dir`` or ""; "" without
            ``last_checkpoint``, as in fvcore.
        """
        if not super().has_checkpoint():
            return ""
        try:
            with PathManager.open(os.path.join(self.save_dir, "last_checkpoint"), "rb") as f:
                name = f.read().decode().strip()
        except (OSError, UnicodeDecodeError):  # binary garbage: fvcore fails to decode it
            name = ""
        tagged = os.path.join(self.save_dir, name)
        # torch.save writes a zip archive whose directory comes last: a truncated or garbage file
        # lacks it. Checked without loading, so that choosing a checkpoint costs no tensor reads.
        if name and zipfile.is_zipfile(tagged):
            return tagged
        found = glob.glob(os.path.join(glob.escape(self.save_dir), "model_*.pth"))
        newest = max(filter(zipfile.is_zipfile, found), key=os.path.getmtime, default="")
        problem = f"names {tagged}, which is missing or incomplete" if name else "is unreadable"
        fallback = (
            f"resuming from the newest complete {newest} instead"
            if newest
            else "not resuming, as no complete model_*.pth is there either; the model starts from "
            "MODEL.WEIGHTS at iteration 0"
        )
        # DefaultTrainer asks twice per resume; the problem is told once.
        message = f"last_checkpoint in {self.save_dir} {problem}: {fallback}."
        log_first_n(logging.WARNING, message, key="message", name=self.logger.name)
        return newest

    def load(self, path: str, *args, **kwargs):
        check_weights_exist(path)
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        # torch.load reports a text file as an unpickling error or "KeyError: 101", and a
        # truncated one as a zip error deep in torch: neither says which file, nor the fix.
        try:
            loaded = super()._load_file(filename)
            if not isinstance(loaded.get("model"), dict):
                raise TypeError("it holds no model state dict")
        except Exception as e:
            raise InputError(
                f"Checkpoint {filename!r} is not a readable checkpoint ({load_error_reason(e)}); it "
                "is truncated, corrupt or another kind of file. Set MODEL.WEIGHTS to a .pth/.pkl "
                "checkpoint or a model-zoo name (retinamask://...)."
            ) from e
        return loaded


def check_weights_exist(path: str) -> None:
    """
    Raise an :class:`InputError` if ``path``, a value of MODEL.WEIGHTS, is a local file that
    does not exist (fvcore only asserts it). Other prefixes fail in their own PathHandler.
    """
    local = path.split("?")[0] if path else ""
    if local and "://" not in local and not os.path.isfile(local):
        raise InputError(
            f"Checkpoint {local!r}: no such file. Set MODEL.WEIGHTS to an existing .pth/.pkl "
            "checkpoint, a model-zoo name (retinamask://...) or '' for random weights."
        )


def load_error_reason(error: Exception) -> str:
    """
    Why torch could not load a file, in one sentence: its message's first (torch follows it with
    advice to load untrusted files without ``weights_only``).
    """
    lines = str(error).strip().splitlines()
    first = re.split(r"(?<=\.)\s", lines[0])[0] if lines else "no details"
    return f"{type(error).__name__}: {first}"


def write_atomically(path: str, mode: str, write) -> None:
    """
    Call ``write(f)`` on a temporary file ``.<name>.<random>.partial`` next to ``path`` and
    rename it to ``path`` once it is on disk: ``path`` keeps its old contents or gets the
    complete new ones. ``path`` must be local: not every PathHandler can rename over a file.
    """
    directory = os.path.dirname(path) or "."
    # A plain open() of a name no other save uses, so that the umask applies as to any file.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    try:
        with PathManager.open(temporary, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    # Makes the rename itself durable: without it, a power loss can bring back the old entry.
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

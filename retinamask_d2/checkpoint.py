"""
A checkpointer whose files are complete whenever they exist, so that training killed at any
moment (SIGKILL or power loss included, also in the middle of a save) resumes from the last
complete checkpoint, and whose loads fail with one line naming the file and the fix.
"""

import os
import uuid
import zipfile

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .config import InputError

__all__ = ["AtomicDetectionCheckpointer", "write_atomically"]

# Suffix of the temporary files a save writes before renaming them into place.
_PARTIAL_SUFFIX = ".partial"


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` that writes ``<name>.pth`` and then ``last_checkpoint`` each
    with :func:`write_atomically`. fvcore writes both in place, so a save that is killed leaves
    a truncated ``.pth``, and when it overwrites an existing name (``model_final.pth`` of an
    earlier run, or the same iteration after a resume) ``last_checkpoint`` already points to it.
    Here ``last_checkpoint`` is only replaced after the file it names is complete. ``save_dir``
    must be a local directory, as ``cfg.OUTPUT_DIR`` normally is.

    Resuming survives what a copied or damaged output directory holds: a ``last_checkpoint``
    that is garbage or names a missing or incomplete file resumes from the newest complete
    ``model_*.pth``, else from the weights given to :meth:`resume_or_load`, with a warning.
    A file that is not a checkpoint fails to load with an :class:`InputError`.
    """

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        # DefaultTrainer asks has_checkpoint() twice per resume; each problem is told once.
        self._warned = set()

    def save(self, name: str, **kwargs) -> None:
        """
        Same arguments and file contents as :meth:`fvcore.common.checkpoint.Checkpointer.save`.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self._remove_partial_files()
        self.logger.info(f"Saving checkpoint to {save_file}")
        write_atomically(save_file, "wb", lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        write_atomically(save_file, "w", lambda f: f.write(last_filename_basename))

    def _remove_partial_files(self) -> None:
        # Only the main process saves into save_dir, so a temporary file found here was left by
        # a save that was killed; it is never the target of last_checkpoint.
        for name in PathManager.ls(self.save_dir):
            if name.startswith(".") and name.endswith(_PARTIAL_SUFFIX):
                try:
                    PathManager.rm(os.path.join(self.save_dir, name))
                except FileNotFoundError:
                    pass

    def has_checkpoint(self) -> bool:
        """
        Returns:
            bool: whether :meth:`get_checkpoint_file` finds a complete checkpoint to resume
            from. False, with a warning, when ``last_checkpoint`` exists but neither it nor
            any ``model_*.pth`` leads to one: training then starts from the given weights.
        """
        return bool(self.get_checkpoint_file())

    def get_checkpoint_file(self) -> str:
        """
        Returns:
            str: the file ``last_checkpoint`` names when it is complete; else the newest
            complete ``model_*.pth`` in ``save_dir``; else "" (also when there is no
            ``last_checkpoint``, as in fvcore).
        """
        if not super().has_checkpoint():
            return ""
        try:
            with PathManager.open(os.path.join(self.save_dir, "last_checkpoint"), "rb") as f:
                tagged = f.read().decode().strip()
        except (OSError, UnicodeDecodeError):  # binary garbage: fvcore fails to decode it
            tagged = ""
        tagged = os.path.join(self.save_dir, tagged) if tagged else ""
        if _is_complete_checkpoint(tagged):
            return tagged
        problem = f"last_checkpoint in {self.save_dir} " + (
            f"names {tagged}, which is missing or incomplete" if tagged else "is unreadable"
        )
        candidates = [
            os.path.join(self.save_dir, name)
            for name in PathManager.ls(self.save_dir)
            if name.startswith("model_") and name.endswith(".pth")
        ]
        complete = [f for f in candidates if _is_complete_checkpoint(f)]
        if complete:
            newest = max(complete, key=os.path.getmtime)
            self._warn_once(f"{problem}: resuming from the newest complete {newest} instead.")
            return newest
        self._warn_once(
            f"{problem}, and no complete model_*.pth is there: not resuming; the model starts "
            "from MODEL.WEIGHTS at iteration 0."
        )
        return ""

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.logger.warning(message)

    def load(self, path: str, *args, **kwargs):
        # fvcore asserts that a missing file exists; name it and the fix instead. Only local
        # paths are checked here: other prefixes fail in their own PathHandler.
        local = path.split("?")[0] if path else ""
        if local and "://" not in local and not os.path.isfile(local):
            raise InputError(
                f"Checkpoint {local!r}: no such file. Set MODEL.WEIGHTS to an existing .pth/.pkl "
                "checkpoint, a model-zoo name (retinamask://...) or '' for random weights."
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        try:
            loaded = super()._load_file(filename)
        except InputError:
            raise
        except Exception as e:
            # torch.load reports a text file as an unpickling error or "KeyError: 101", and a
            # truncated one as a zip error deep in torch: neither says which file, nor the fix.
            reason = str(e).splitlines()[0] if str(e) else "no details"
            raise InputError(
                f"Checkpoint {filename!r} is not a readable checkpoint ({type(e).__name__}: "
                f"{reason}); it is truncated, corrupt or another kind of file. Set MODEL.WEIGHTS "
                "to a .pth/.pkl checkpoint or a model-zoo name (retinamask://...)."
            ) from e
        if not isinstance(loaded.get("model"), dict):
            raise InputError(
                f"Checkpoint {filename!r} holds no model state dict. Set MODEL.WEIGHTS to a "
                ".pth/.pkl checkpoint or a model-zoo name (retinamask://...)."
            )
        return loaded


def _is_complete_checkpoint(path: str) -> bool:
    # torch.save writes a zip archive whose directory comes last: a truncated or garbage file
    # lacks it. Checked without loading, so that choosing a checkpoint costs no tensor reads.
    return bool(path) and os.path.isfile(path) and zipfile.is_zipfile(path)


def write_atomically(path: str, mode: str, write) -> None:
    """
    Call ``write(f)`` on a temporary file next to ``path`` and rename it to ``path`` once it
    is on disk. ``path`` either keeps its old contents or gets the complete new ones. ``path``
    must be local: renaming over a file is not an operation of every PathHandler.
    """
    directory = os.path.dirname(path) or "."
    # A plain open() of a name no other save uses, so that the umask applies as to any file.
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}{_PARTIAL_SUFFIX}"
    )
    try:
        with PathManager.open(temporary, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            PathManager.rm(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable: without it, a power loss can bring back the old entry.
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

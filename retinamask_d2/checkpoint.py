"""
A checkpointer whose files are complete whenever they exist, so that training killed at any
moment (SIGKILL or power loss included, also in the middle of a save) resumes from the last
complete checkpoint.
"""
import glob
import os
import tempfile

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer"]

# Suffix of the temporary files a save writes before renaming them into place.
_PARTIAL_SUFFIX = ".partial"


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once, at import: setting the umask to read it is not safe while other threads create files.
_UMASK = _read_umask()


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` that writes ``<name>.pth`` and then ``last_checkpoint`` each
    to a temporary file in ``save_dir``, flushes and fsyncs it, and renames it over the target
    with :func:`os.replace`. fvcore writes both in place, so a save that is killed leaves a
    truncated ``.pth``, and when it overwrites an existing name (``model_final.pth`` of an
    earlier run, or the same iteration after a resume) ``last_checkpoint`` already points to it.

    Here ``last_checkpoint`` always names a complete file: it is only replaced after the
    checkpoint it names has been renamed into place, and both renames are made durable by
    fsyncing the directory. ``save_dir`` must be a local directory, as ``cfg.OUTPUT_DIR``
    normally is.
    """

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
        for path in glob.glob(os.path.join(self.save_dir, f".*{_PARTIAL_SUFFIX}")):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def write_atomically(path: str, mode: str, write) -> None:
    """
    Call ``write(f)`` on a temporary file next to ``path`` and rename it to ``path`` once it
    is on disk. ``path`` either keeps its old contents or gets the complete new ones.
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=_PARTIAL_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner only; give it the permissions a plain
        # open() would, as fvcore's checkpoints have.
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
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

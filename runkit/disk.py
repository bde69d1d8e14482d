"""Writing where the user can read it, and saying so when the disk is full.

Two things every writer in this project needs, and no writer should get wrong on its own:

1. Modes from the user's umask. A model folder is read by colleagues and serving processes, so
   it gets the modes any new file gets (0644 files, 0755 folders under umask 022). Two tools
   get this wrong quietly: tempfile.mkdtemp makes folders 0700, and safetensors (0.8) writes
   its files 0600. `follow_umask` puts the usual modes back.
2. A full disk named, not dumped. Every save here writes under a temporary name and renames
   when whole, so a full disk loses nothing; `room_for` turns the raw error (an OSError, or
   safetensors' SafetensorError wrapping one, or torch.save's "file write failed") into one line:
   what was being saved, into which folder, about how many bytes it needed, and that nothing
   was lost.
"""
import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; disk quota exceeded


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        old = os.umask(0o022)
        os.umask(old)
        return old


def follow_umask(path):
    """Give `path`, and everything in it when it is a folder, the modes the umask gives a new
    file (0o666 & ~umask) or folder (0o777 & ~umask)."""
    path, mask = Path(path), umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def nbytes(obj) -> int:
    """Bytes of every tensor or array in a (nested) dict, list or tuple: what saving it needs."""
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return int(getattr(obj, "nbytes", 0))


def is_full(error: BaseException, folder=None, needed: int = 0) -> bool:
    """Whether `error` means the disk (or the user's quota) ran out of space."""
    if isinstance(error, OSError) and error.errno in FULL:
        return True
    text = str(error)
    # safetensors' Rust writer wraps the OS error in a SafetensorError whose text alone keeps the errno:
    # "Error while serializing: I/O error: No space left on device (os error 28)"
    if type(error).__name__ == "SafetensorError":
        return any(f"os error {code})" in text for code in FULL)
    # torch.save reports no errno ("PytorchStreamWriter failed writing file ...: file write failed"):
    # call it a full disk when the disk has less room left than the save needed.
    return "file write failed" in text and folder is not None and free_bytes(folder) < needed


def free_bytes(folder) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


class DiskFull(SystemExit):
    """A full disk, already named. A save inside another (an adapter inside a checkpoint) is
    named again by the outer one, which knows the folder the user asked for."""


@contextmanager
def room_for(folder, needed: int, what: str, kept: str = "the folder holds what it held before"):
    """Run a save into `folder`; if the disk fills, stop with one line naming `what`, the folder,
    about `needed` bytes, the free space now, and what was kept (`kept`). The writer inside must
    leave nothing half-written (they all write under a temporary name and remove it on error)."""
    try:
        yield
    except (Exception, DiskFull) as e:
        if not (isinstance(e, DiskFull) or is_full(e, folder, needed)):
            raise
        raise DiskFull(f"{what}: the disk holding {folder} is full (this needs about {size(needed)}; "
                         f"{size(free_bytes(folder))} free now). Nothing was lost: the partial copy was removed "
                         f"and {kept}. Free some space, or choose a folder on another disk, and run again.") from None


def replace_folder(new: Path, folder: Path):
    """Put the complete folder `new` at `folder`. An old `folder` is moved aside first and deleted
    only after `new` is in place, so at every instant one complete copy exists under a known name."""
    folder = Path(folder)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        Path(new).rename(folder)
        shutil.rmtree(old)
    else:
        Path(new).rename(folder)

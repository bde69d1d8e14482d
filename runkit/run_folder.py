"""The output folder of a train.py run: whose it is, how things are written into it, checkpoints.

    out/
      .train.lock               held (flock) by the one run writing here; holds that run's PID
      checkpoints/step-0000040/ state.pt (+ adapter/ for neo/lora), renamed in from .step-0000040.tmp
      checkpoints/latest        the name of the newest checkpoint
      metrics.jsonl, report_before.json, report.json, loss_curve.png
      student_base/ adapter/ model/

Four rules keep a run from losing anything or leaving something silently wrong:

1. The folder is the user's. A run writes into an empty (or new) folder, continues its own run
   there (--resume), or replaces the outputs listed in OUTPUTS when told to (--overwrite). Files
   it did not write are never touched.
2. One run at a time. The lock is an flock on .train.lock: the kernel drops it when the process
   ends, however it ends, so a killed run never leaves a stale lock behind. A second run is
   refused with the first one's PID.
3. Everything appears complete or not at all: written under a temporary name, then renamed. A
   folder being replaced is moved aside and deleted only once its successor is in place, so at
   every instant one complete copy exists (`replace_folder`).
4. --resume takes the newest checkpoint that loads, and names any damaged one it skips.
"""
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from runkit.disk import replace_folder

# What train.py writes; --overwrite removes exactly these, nothing else.
OUTPUTS = ("checkpoints", "metrics.jsonl", "report_before.json", "report.json", "loss_curve.png",
           "student_base", "adapter", "model")
LOCK = ".train.lock"


# ----------------------------------------------------------------------------------------------
# Whose folder it is, and one run at a time

class RunLock:
    """An exclusive flock on out/.train.lock, held until release() (or the process's end)."""

    def __init__(self, out: Path):
        self.path = Path(out).resolve() / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncate before holding it
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said which"
            os.close(self.fd)
            raise SystemExit(f"--out {out} is in use by another train.py run ({holder}); wait for it to finish, "
                             f"or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"PID {os.getpid()} on {socket.gethostname()}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self):
        _HELD.pop(self.path.parent, None)
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


_HELD: dict[Path, RunLock] = {}  # locks this process holds, by folder


def claim(out: Path, resume: bool, overwrite: bool) -> RunLock:
    """Lock `out` for this run and check that it may write there (rank 0 only).

    The lock comes first, so a second run started at the same moment is told about the first one
    rather than about files the first one has just written. A process runs one training at a time,
    so a lock this process still holds from an earlier run that stopped with an error (train.main
    called in-process, as the tests do) is released and taken again.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if out in _HELD:
        _HELD.pop(out).release()
    lock = _HELD[out] = RunLock(out)
    try:
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if present and not resume:
            if not overwrite:
                shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
                raise SystemExit(f"--out {out} already holds files ({shown}). Pass --resume to continue the run "
                                 f"there, --overwrite to replace its training outputs ({', '.join(OUTPUTS)}; other "
                                 f"files are kept), or choose another --out.")
            for name in OUTPUTS:  # --overwrite: this run's outputs start from nothing, nothing else is touched
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------------------------
# Complete or not at all

def write_text(path: Path, text: str):
    """Write a file under a temporary name and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj, indent=None):
    write_text(path, json.dumps(obj, indent=indent))


# ----------------------------------------------------------------------------------------------
# Checkpoints

def publish_checkpoint(ckpts: Path, step: int, write, keep: int = 2) -> Path:
    """Write a checkpoint with `write(folder)` into a temporary folder, put it in place, point
    `latest` at it, and delete all but the newest `keep`. Re-saving a step that exists (resuming a
    finished run) swaps the folders with replace_folder: the old copy goes only after the new one is
    whole, and `latest` always names a complete checkpoint or, for an instant, its moved-aside copy,
    which find_checkpoint also reads."""
    ckpts = Path(ckpts)
    final, tmp = ckpts / f"step-{step:07d}", ckpts / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:  # a full disk, a kill signal: the checkpoints already saved stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)
    write_text(ckpts / "latest", final.name)
    newest = sorted(p.name for p in ckpts.glob("step-*"))[-keep:]
    for old in ckpts.glob("step-*"):
        if old.name < final.name and old.name not in newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(".step-*.old-*"):  # left by an interrupted re-save; superseded now
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(out: Path, load, say=print):
    """(folder, load(folder)) for the newest checkpoint in out/checkpoints that loads.

    Tried in order: the one `latest` names, then every step-* folder newest first, then copies
    moved aside by an interrupted re-save (.step-*.old-*). A checkpoint whose `load` raises (a
    truncated state.pt, a missing file) is named and skipped, so a damaged latest falls back to the
    one before it, saying so.
    """
    ckpts = Path(out) / "checkpoints"
    pointer = ckpts / "latest"
    if not pointer.exists() and not any(ckpts.glob("step-*")):
        raise SystemExit(f"--resume: no checkpoint in {ckpts} (no 'latest' file). "
                         f"Start without --resume, or point --out at the run to continue.")
    named = [ckpts / pointer.read_text().strip()] if pointer.exists() else []
    # Newest step first; a step's moved-aside copy right after the step's own folder.
    order = lambda p: (p.name.lstrip(".")[5:12], not p.name.startswith("."))
    others = sorted([*ckpts.glob("step-*"), *ckpts.glob(".step-*.old-*")], key=order, reverse=True)
    candidates = list(dict.fromkeys(named + others))
    damaged = []
    for folder in candidates:
        try:
            state = load(folder)
        except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ...
            damaged.append(f"{folder.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        if damaged:
            say(f"--resume: skipped damaged checkpoint(s) {'; '.join(damaged)}; continuing from {folder.name}")
        return folder, state
    raise SystemExit(f"--resume: no checkpoint in {ckpts} could be read: {'; '.join(damaged)}. "
                     f"Start without --resume (and with --overwrite), or restore a checkpoint.")

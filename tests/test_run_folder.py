"""runkit/run_folder.py: the output folder is the user's, one run at a time, writes complete or not at all,
and --resume finds the newest checkpoint that loads. train.py's own use of it is in test_train.py."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runkit import run_folder

ROOT = Path(__file__).resolve().parent.parent


def test_a_folder_with_files_is_refused_unless_resume_or_overwrite(tmp_path):
    run_folder.claim(tmp_path / "new", resume=False, overwrite=False).release()  # new: fine
    run_folder.claim(tmp_path / "new", resume=False, overwrite=False).release()  # only our lock file: fine
    out = tmp_path / "used"
    (out / "model").mkdir(parents=True)
    (out / "model" / "important.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match=r"already holds files \(metrics.jsonl, model, notes.txt\).*--resume.*--overwrite"):
        run_folder.claim(out, resume=False, overwrite=False)
    assert (out / "model" / "important.txt").read_text() == "mine"  # refused: nothing touched
    run_folder.claim(out, resume=True, overwrite=False).release()   # continuing its own run: allowed, untouched
    assert (out / "metrics.jsonl").exists()
    run_folder.claim(out, resume=False, overwrite=True).release()   # replace the run's outputs, only those
    assert sorted(p.name for p in out.iterdir()) == [".train.lock", "notes.txt"]


def test_a_second_run_is_refused_with_the_first_ones_pid_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    code = f"from runkit import run_folder; import time; run_folder.claim({str(tmp_path)!r}, False, False); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SystemExit, match=rf"in use by another train.py run \(PID {holder.pid} on "):
        run_folder.claim(tmp_path, resume=True, overwrite=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run_folder.claim(tmp_path, resume=True, overwrite=False).release()  # the kernel dropped the dead process's lock


def test_this_process_takes_over_its_own_unreleased_lock(tmp_path):
    """train.main called in-process: a run that stopped with an error must not lock out the next one."""
    run_folder.claim(tmp_path, resume=False, overwrite=False)  # never released
    run_folder.claim(tmp_path, resume=True, overwrite=False).release()
    with run_folder.RunLock(tmp_path):  # a second, independent holder is refused even in one process
        with pytest.raises(SystemExit, match=rf"PID {os.getpid()} "):
            run_folder.RunLock(tmp_path)


def test_write_text_is_complete_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    run_folder.write_text(path, "old")

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run_folder.write_text(path, "new")
    assert path.read_text() == "old"


def save(step, value):
    return lambda folder: torch.save({"step": step, "value": value}, folder / "state.pt")


def load(folder):
    return torch.load(folder / "state.pt")


def test_resave_of_the_latest_step_never_loses_it(tmp_path, monkeypatch):
    """A crash between moving the old step folder aside and moving the new one in (the window the old
    code had between rmtree and rename): latest names a folder that is gone for the moment, and
    find_checkpoint reads the moved-aside copy instead of falling back to an older step."""
    ckpts = tmp_path / "checkpoints"
    run_folder.publish_checkpoint(ckpts, 1, save(1, "one"))
    run_folder.publish_checkpoint(ckpts, 2, save(2, "two"))
    real_rename, calls = Path.rename, []

    def rename(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # the first rename moved step-2 aside; die before the new copy goes in
            raise KeyboardInterrupt("killed inside the re-save")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run_folder.publish_checkpoint(ckpts, 2, save(2, "two again"))
    monkeypatch.undo()
    assert not (ckpts / "step-0000002").exists() and (ckpts / "latest").read_text() == "step-0000002"
    folder, state = run_folder.find_checkpoint(tmp_path, load)
    assert folder.name.startswith(".step-0000002.old-") and state == {"step": 2, "value": "two"}
    run_folder.publish_checkpoint(ckpts, 2, save(2, "two again"))  # the next save completes normally
    assert run_folder.find_checkpoint(tmp_path, load)[1]["value"] == "two again"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001", "step-0000002"]  # aside copy gone


def test_a_damaged_latest_falls_back_to_the_newest_that_loads(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        run_folder.publish_checkpoint(ckpts, step, save(step, step), keep=3)
    state_pt = ckpts / "step-0000003" / "state.pt"
    state_pt.write_bytes(state_pt.read_bytes()[:200])  # truncated
    folder, state = run_folder.find_checkpoint(tmp_path, load)
    assert folder.name == "step-0000002" and state["step"] == 2
    assert "skipped damaged checkpoint(s) step-0000003" in capsys.readouterr().out
    (ckpts / "step-0000002" / "state.pt").unlink()
    (ckpts / "step-0000001" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"no checkpoint .* could be read: step-0000003 .*step-0000002 .*step-0000001"):
        run_folder.find_checkpoint(tmp_path, load)


def test_no_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_folder.find_checkpoint(tmp_path, load)

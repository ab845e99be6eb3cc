"""edm/files.py: a failed write is one line naming the folder and its free space; one process owns a folder;
records compare by dotted keys."""

from __future__ import annotations

import errno

import pytest

from edm.files import FolderLock, OutputWriteError, atomic_write


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path):
    def no_space(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError, match=f"cannot write x.pt in {tmp_path}: No space left on device; .* [MG]iB free there"):
        atomic_write(tmp_path / "x.pt", no_space)

    def miniz(f):  # what torch.save raises when the disk fills mid-archive
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(OutputWriteError, match="cannot write x.pt.*file write failed"):
        atomic_write(tmp_path / "x.pt", miniz)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_torch_save_on_a_full_disk_is_one_line_naming_the_folder_and_the_reason(tmp_path):
    """torch.save into a file whose write fails with ENOSPC after its first records raises RuntimeError "unexpected
    pos ..." (the OSError its context): atomic_write names the folder and "No space left on device", and leaves no
    temporary."""
    import torch

    class Full:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            pass

    with pytest.raises(OutputWriteError, match=f"cannot write x.pt in {tmp_path}: No space left on device; "):
        atomic_write(tmp_path / "x.pt", lambda f: torch.save({"w": torch.zeros(1000)}, Full(f)), durable=False)
    assert list(tmp_path.iterdir()) == []


def test_one_process_owns_a_folder_and_the_refusal_names_the_option_and_what_holds_it(tmp_path):
    """The refusal names the holder's kind, not the asker's: a sampler pointed at a training's folder
    hears "in use by a training"."""
    import os

    from edm.files import FolderInUseError, FolderLock

    with FolderLock(tmp_path / "out", key="out", owner="sampler"):
        with pytest.raises(FolderInUseError, match=rf"out {tmp_path / 'out'} is in use by a sampler \(pid {os.getpid()}, "
                                                   r".*\); wait for it to finish, or choose another out") as busy:
            FolderLock(tmp_path / "out", key="out", owner="sampler").acquire()
        assert busy.value.holder.startswith(f"a sampler (pid {os.getpid()}, ")  # for callers with their own message
    with FolderLock(tmp_path / "run"):  # owner: training
        with pytest.raises(FolderInUseError, match=rf"out {tmp_path / 'run'} is in use by a training \(pid "):
            FolderLock(tmp_path / "run", key="out", owner="sampler").acquire()
    with FolderLock(tmp_path / "study", key="out", owner="NFE study"):
        with pytest.raises(FolderInUseError, match="in use by an NFE study"):
            FolderLock(tmp_path / "study", key="run_dir").acquire()
    FolderLock(tmp_path / "out").acquire().release()  # released with the block


def test_a_folder_whose_owner_was_killed_is_taken_once_the_processes_it_forked_let_go(tmp_path, monkeypatch):
    """kill -9 of a training leaves its forked DataLoader workers holding run_dir's lock for up to 5 s: a resume at
    once is not refused as "in use by a training (pid N)" of a pid that has ended; it waits for the lock (up to
    ENDED_OWNER_GRACE_S, after which the refusal says that the owner has ended and what still holds the folder)."""
    import os
    import subprocess
    import sys
    import time

    import edm.files
    from conftest import REPO
    from edm.files import FolderInUseError, FolderLock, folder_holder

    script = ("import os, sys, time\nfrom edm.files import FolderLock\n"
              f"FolderLock({str(tmp_path / 'run')!r}).acquire()\n"
              "if os.fork() == 0:\n    time.sleep(3)\n    os._exit(0)\n"  # the worker: holds the lock a while
              "os._exit(0)\n")  # the owner ends at once
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert folder_holder(tmp_path / "run").startswith("a training")  # the worker holds it still
    monkeypatch.setattr(edm.files, "ENDED_OWNER_GRACE_S", 0.2)
    with pytest.raises(FolderInUseError, match=r"in use by a training \(pid \d+, .*\), which has ended while processes it "
                                               r"started still hold the folder"):
        FolderLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    start = time.monotonic()
    FolderLock(tmp_path / "run").acquire().release()
    assert time.monotonic() - start < 10


def test_a_lock_taken_anew_while_its_ended_owner_was_waited_for_names_the_new_owner(tmp_path, monkeypatch):
    """The lock record of an ended owner is still in the file for the instant between a new owner's lock and its
    record: the refusal after the wait names the owner that holds the folder then, not the ended one."""
    import json
    import os
    import subprocess
    import sys
    import threading

    import edm.files
    from edm.files import FolderInUseError, FolderLock

    held = FolderLock(tmp_path / "run", owner="sampler").acquire()
    try:
        lock_file = tmp_path / "run" / ".lock"
        record = lock_file.read_text()
        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock_file.write_text(json.dumps({"owner": "training", "pid": int(ended.stdout), "host": os.uname().nodename}))
        threading.Timer(0.1, lambda: lock_file.write_text(record)).start()  # the new owner writes its record
        monkeypatch.setattr(edm.files, "ENDED_OWNER_GRACE_S", 0.5)
        with pytest.raises(FolderInUseError, match=r"is in use by a sampler \(pid \d+") as err:
            FolderLock(tmp_path / "run").acquire()
        assert "has ended" not in str(err.value)
    finally:
        held.release()


def test_a_folder_option_that_names_a_file_is_refused_naming_the_option(tmp_path):
    from edm.files import FolderLock, OutputWriteError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputWriteError, match=rf"^run_dir={tmp_path / 'notes.txt'} is a file, not a folder: pass run_dir=DIR"):
        FolderLock(tmp_path / "notes.txt").acquire()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_records_differ_at_dotted_keys_and_a_missing_leaf_is_none():
    from dataclasses import dataclass

    from edm.files import differences, flatten

    @dataclass
    class Options:
        steps: int = 18
        grid: tuple = (1, 2)

    assert flatten({"a": Options(), "b": None}) == {"a.steps": 18, "a.grid": [1, 2], "b": None}
    assert differences({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}, "c": 4}) == [("a.y", 2, 3), ("c", None, 4)]


def test_a_folder_lock_says_whether_it_made_the_folder(tmp_path):
    """created: the operating system's mkdir of the folder itself succeeded, not that the path as written did not
    exist (typo/../run names an existing folder once typo is made)."""
    (tmp_path / "run").mkdir()
    for folder, made in ((tmp_path / "new", True), (tmp_path / "run", False), (tmp_path / "typo" / ".." / "run", False)):
        lock = FolderLock(folder).acquire()
        try:
            assert lock.created is made, folder
        finally:
            lock.release()


def test_a_folder_turn_that_must_wait_says_what_it_waits_for_and_then_takes_it(tmp_path, caplog):
    """A turn held by another process (an edm-eval stopped mid-merge) is waited for with a warning naming the folder,
    not in silence; once let go, the waiting one has the turn."""
    import fcntl
    import os
    import threading

    from edm.files import folder_turn

    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: conflicts as another process's would
    entered = threading.Event()

    def take_turn() -> None:
        with folder_turn(tmp_path):
            entered.set()

    waiter = threading.Thread(target=take_turn)
    with caplog.at_level("WARNING", logger="edm.files"):
        waiter.start()
        assert not entered.wait(0.5)  # blocked while the other holds it
        os.close(held)
        waiter.join(5)
    assert entered.is_set()
    assert f"waiting for another process that is writing in {tmp_path}" in caplog.text

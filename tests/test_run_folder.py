"""The run folder shared by the training scripts (:mod:`tasks.run_folder`): one run per folder, a lock that names
its holder and survives races, writable before any work, and checkpoints that run no code.

The scripts' own uses are tested with them (``test_faults_omniglot.py``, ``test_sinusoid.py``,
``test_weight_decay.py``); here the class is driven directly, with the ``files=`` of a script of one's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import socket
import sys
from pathlib import Path

import pytest
import torch

from tasks.run_folder import ResultsFolder, RunFolder, RunFolderError, atomic_write, load_checkpoint

FILES = ("results.json", "model.pt", "plots")  # a script's run: two files and a folder


def test_a_run_is_any_of_the_files_and_only_those_are_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    RunFolder(tmp_path, files=FILES).release()   # other files do not make a run
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_text("")
    (tmp_path / "model.pt").write_text("")
    with pytest.raises(RunFolderError, match=r"already holds a run \(model.pt, plots\); continue it with --resume, "
                                             r"replace it with --overwrite, or choose another run.dir"):
        RunFolder(tmp_path, files=FILES)
    assert not (tmp_path / "run.lock").exists()   # a refused start leaves no lock behind
    with RunFolder(tmp_path, files=FILES, overwrite=True):
        assert (tmp_path / "run.lock").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.lock"]
    assert not (tmp_path / "run.lock").exists()   # released when the block ends


def test_resume_needs_the_checkpoint_and_a_script_without_one_cannot_resume(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"--resume: .* holds results.json but no checkpoint"):
        RunFolder(tmp_path, files=FILES, resume=True, checkpoint="model.pt")
    (tmp_path / "model.pt").write_text("")
    RunFolder(tmp_path, files=FILES, resume=True, checkpoint="model.pt").release()
    with pytest.raises(RunFolderError, match=r"out_dir=.*cannot resume a run; replace it with --overwrite"):
        RunFolder(tmp_path, files=FILES, resume=True, checkpoint=None, key="out_dir")
    with pytest.raises(RunFolderError, match=r"already holds a run \(results.json, model.pt\); replace it with "
                                             r"--overwrite, or choose another out_dir\.$"):
        RunFolder(tmp_path, files=FILES, checkpoint=None, key="out_dir")
    with pytest.raises(RunFolderError, match="run.resume and run.overwrite exclude each other"):
        RunFolder(tmp_path, files=FILES, resume=True, overwrite=True)


def test_stray_temporaries_of_the_files_are_removed_and_others_kept(tmp_path):
    (tmp_path / "model.pt.tmp").write_text("half")       # a write killed before its rename
    (tmp_path / "model.ptab12.tmp").write_text("half")
    (tmp_path / "other.tmp").write_text("mine")
    RunFolder(tmp_path, files=FILES).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tmp"]


def test_a_live_lock_is_refused_naming_the_setting_and_a_dead_ones_taken_over(tmp_path, capsys):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                   "started": "earlier"}))
    with pytest.raises(RunFolderError, match=rf"in use by pid {os.getppid()} on .* \(since earlier\); .* another "
                                             rf"out_dir\. If that process is gone, delete .*run.lock"):
        RunFolder(tmp_path, files=FILES, key="out_dir")
    dead = 2 ** 22 + 17  # above the default pid_max, so no process holds it
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    with RunFolder(tmp_path, files=FILES):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "no longer running" in capsys.readouterr().err
    (tmp_path / "run.lock").write_text("{not json")
    with pytest.raises(RunFolderError, match="unreadable lock"):
        RunFolder(tmp_path, files=FILES)


def test_an_unwritable_folder_is_named_with_its_setting(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match=r"a_file/run is not writable .*choose another out_dir"):
        RunFolder(tmp_path / "a_file" / "run", files=FILES, key="out_dir")


def test_two_runs_started_together_in_one_folder_one_is_refused(tmp_path):
    import subprocess
    import time

    claim = ("import sys, time\n"
             "from pathlib import Path\n"
             "from tasks.run_folder import RunFolder, RunFolderError\n"
             "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
             "try:\n"
             "    folder = RunFolder(sys.argv[1], files=('results.json',))\n"
             "except RunFolderError as err:\n"
             "    print('refused:', err, flush=True)\n"
             "    sys.exit(0)\n"
             "print('claimed', flush=True)\n"
             "release = Path(sys.argv[3])\n"
             "while not release.exists():   # hold the folder until the other start has been answered\n"
             "    time.sleep(0.05)\n"
             "folder.release()\n")
    repo = Path(__file__).resolve().parents[1]
    at, release = str(time.time() + 2.0), tmp_path.parent / f"{tmp_path.name}-release"  # both start together
    procs = [subprocess.Popen([sys.executable, "-c", claim, str(tmp_path), at, str(release)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(repo))) for _ in range(2)]
    try:
        answers = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        release.touch()
        for p in procs:
            p.communicate(timeout=60)
    assert answers[0] == "claimed" and answers[1].startswith("refused:") and "in use by pid" in answers[1]
    assert not (tmp_path / "run.lock").exists()


def test_the_lock_works_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = RunFolder(tmp_path, files=FILES)
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 4242, "host": "other-host"}))
    with pytest.raises(RunFolderError, match="in use by pid 4242"):
        RunFolder(tmp_path, files=FILES)
    first.held = False   # the lock now names another holder; leave it to the test's tmp_path


def test_load_checkpoint_takes_weights_and_refuses_the_rest(tmp_path):
    torch.save({"hparams": {"w": torch.ones(2)}, "step": 3}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(RunFolderError, match=r"other\.pt is not a training checkpoint \(no 'hparams' dict"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(RunFolderError, match=r"cut\.pt is damaged"):
        load_checkpoint(tmp_path / "cut.pt")


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write(path, lambda f: f.write(b"old"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"old" and (path.stat().st_mode & 0o777) == 0o666 & ~umask

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["results.json"]

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device \(writing .*results.json; its previous version"):
        atomic_write(path, full)
    assert path.read_bytes() == b"old"


def test_a_results_folder_keeps_an_earlier_run_unless_overwritten(tmp_path):
    folder = ResultsFolder(tmp_path / "out")
    assert (tmp_path / "out" / "run.lock").exists()  # held from the start until the results are saved
    assert json.loads(folder.save({"a": 1}).read_text()) == {"a": 1} and not (tmp_path / "out" / "run.lock").exists()
    with pytest.raises(RunFolderError, match=r"holds a run \(results.json\); replace it with --overwrite.*out_dir"):
        ResultsFolder(tmp_path / "out")
    ResultsFolder(tmp_path / "out", overwrite=True).save({"a": 2})
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"a": 2}


def test_an_example_refuses_to_replace_its_earlier_results(tmp_path):
    # examples/qp_layer.py, the fastest example with results: a second run into the same out_dir stops before work
    example = Path(__file__).resolve().parents[1] / "examples" / "qp_layer.py"
    args = [sys.executable, str(example), "steps=1", "batch=4", "timing_batch=2", "timing_repeats=1",
            f"out_dir={tmp_path}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "results.json").read_text()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds a run" in again.stderr and again.stdout == ""
    assert (tmp_path / "results.json").read_text() == written
    assert subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=300).returncode == 0

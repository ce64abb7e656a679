"""Checkpoint rotation keeps the last N and never deletes what `latest` or `best` name;
`resolve_checkpoint` follows the pointer and refuses incomplete directories."""

from __future__ import annotations


import pytest

from megaspark.checkpoint_files import STATE_FILE, CheckpointError, resolve_checkpoint
from megaspark.arguments.configs import CheckpointConfig, RunConfig
from megaspark.training.checkpointing import Checkpointer


def _make(root, *iters):
    for it in iters:
        d = root / f"iter_{it:07d}"
        d.mkdir()
        (d / STATE_FILE).write_bytes(b"x")


def test_rotation_protects_latest_and_best(tmp_path):
    _make(tmp_path, 1, 2, 3, 4, 5, 6)
    (tmp_path / "iter_0000007.tmp").mkdir()  # an unfinished write is not a checkpoint
    (tmp_path / "latest").write_text("iter_0000006")
    (tmp_path / "best").write_text("iter_0000002")
    Checkpointer(RunConfig(checkpoint=CheckpointConfig(keep_last=2)), None, "fp")._rotate(str(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_"))
    assert left == ["iter_0000002", "iter_0000005", "iter_0000006", "iter_0000007.tmp"]


def test_latest_is_kept_even_if_older_than_the_window(tmp_path):
    _make(tmp_path, 1, 2, 3)
    (tmp_path / "latest").write_text("iter_0000001")
    Checkpointer(RunConfig(checkpoint=CheckpointConfig(keep_last=1)), None, "fp")._rotate(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_0000001", "iter_0000003"]


def test_resolve_follows_latest_and_refuses_incomplete(tmp_path):
    _make(tmp_path, 3)
    (tmp_path / "latest").write_text("iter_0000003")
    assert resolve_checkpoint(str(tmp_path)).endswith("iter_0000003")
    (tmp_path / "iter_0000004").mkdir()
    with pytest.raises(CheckpointError, match="no complete megaspark checkpoint"):
        resolve_checkpoint(str(tmp_path / "iter_0000004"))


# ---------------------------------------------------------------------------------------
# manifests: verification and the fallback to the newest intact checkpoint
# ---------------------------------------------------------------------------------------


def _real(root, it, payload=b"shard-bytes" * 50):
    """A checkpoint directory as the saver leaves it: files, then checksums.json."""
    import torch

    from megaspark.checkpoint_files import write_manifest

    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    torch.save({"iteration": it, "has_manifest": True}, d / STATE_FILE)
    (d / "__0_0.distcp").write_bytes(payload)
    write_manifest(str(d))
    return d


def test_verify_names_what_is_wrong(tmp_path):
    from megaspark.checkpoint_files import MANIFEST_FILE, verify_checkpoint

    d = _real(tmp_path, 2)
    assert verify_checkpoint(str(d)) is None
    data = (d / "__0_0.distcp").read_bytes()
    (d / "__0_0.distcp").write_bytes(data[:-7])
    assert "truncated" in verify_checkpoint(str(d))
    (d / "__0_0.distcp").write_bytes(data[:10] + b"Z" + data[11:])
    assert "sha256" in verify_checkpoint(str(d))
    assert verify_checkpoint(str(d), checksums=False) is None  # same size: only the checksum sees it
    (d / "__0_0.distcp").unlink()
    assert "missing" in verify_checkpoint(str(d))
    e = _real(tmp_path, 4)
    (e / MANIFEST_FILE).unlink()
    assert "incomplete" in verify_checkpoint(str(e))  # written with a manifest that is gone
    legacy = tmp_path / "old" / "iter_0000001"
    legacy.mkdir(parents=True)
    import torch

    torch.save({"iteration": 1}, legacy / STATE_FILE)  # before manifests existed
    assert verify_checkpoint(str(legacy)) is None


def test_find_resumable_falls_back_and_reports(tmp_path):
    from megaspark.checkpoint_files import find_resumable

    _real(tmp_path, 2)
    _real(tmp_path, 4)
    newest = _real(tmp_path, 6)
    (tmp_path / "iter_0000008.tmp").mkdir()  # an interrupted save is ignored
    (tmp_path / "latest").write_text("iter_0000006")
    assert find_resumable(str(tmp_path)) == (str(newest), [])
    (newest / "__0_0.distcp").write_bytes(b"short")
    path, problems = find_resumable(str(tmp_path))
    assert path == str(tmp_path / "iter_0000004")
    assert len(problems) == 1 and "iter_0000006" in problems[0] and "truncated" in problems[0]
    with pytest.raises(CheckpointError, match="fall back"):  # an explicit damaged checkpoint
        find_resumable(str(newest))
    assert find_resumable(str(tmp_path / "empty")) == (None, [])


def test_resilience_flags_are_validated():
    from megaspark.arguments import ArgumentError, build_parser, validate_args

    base = ["--target-model", "x", "--data-path", "/"]
    for bad, needle in ((["--exit-duration-in-mins", "0"], "--exit-duration-in-mins"),
                        (["--skip-nonfinite-steps", "-1"], "--skip-nonfinite-steps"),
                        (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes")):
        args = build_parser().parse_args(base + bad)
        with pytest.raises(ArgumentError, match=needle):
            validate_args(args, 1)
    args = build_parser().parse_args(base)
    assert args.auto_resume and not args.exit_signal_handler and args.skip_nonfinite_steps == 0
    assert not build_parser().parse_args(base + ["--no-auto-resume"]).auto_resume


def test_step_control_signal_and_budget():
    import os
    import signal

    import torch

    from megaspark.arguments.configs import ExitConfig
    from megaspark.training.resilience import StepControl

    control = StepControl(ExitConfig(exit_signal_handler=True, exit_duration_in_mins=None), torch.device("cpu"))
    control.install()
    try:
        assert control.decide(torch.tensor(False)).exit_reason is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the process goes on
        d = control.decide(torch.tensor(True))
        assert d.nonfinite and d.exit_reason == "signal SIGUSR1"
    finally:
        control.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    late = StepControl(ExitConfig(exit_signal_handler=False, exit_duration_in_mins=1e-9), torch.device("cpu"))
    assert "exit-duration-in-mins" in late.decide(torch.tensor(False)).exit_reason


def test_collective_timeout_names_rank_and_operation():
    from megaspark.training.resilience import CollectiveTimeoutError, collective_phase

    with pytest.raises(CollectiveTimeoutError, match=r"rank 0: the optimizer step of iteration 3 timed out "
                                                     r"after --distributed-timeout-minutes 0.5"):
        with collective_phase("the optimizer step of iteration 3", 0.5):
            raise RuntimeError("[gloo] Timed out waiting 30000ms for recv operation to complete")
    with pytest.raises(RuntimeError, match="other failure"):  # not a time-out: unchanged
        with collective_phase("x", 0.5):
            raise RuntimeError("other failure")


def test_checkpoint_writer_helper_dies_with_its_rank():
    """A rank killed on a cluster (SIGKILL) must not leave the checkpoint writer's helper
    process (a forked multiprocessing manager) running on the node."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import os, time\n"
            "from megaspark.training.checkpointing import prestart_checkpoint_writer\n"
            "prestart_checkpoint_writer()\n"
            "print(os.getpid(), flush=True)\n"
            "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        assert kids, "the writer's helper process was not started"
        os.kill(pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 10

        def alive():
            out = []
            for k in kids:
                try:
                    with open(f"/proc/{k}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(k)
                except FileNotFoundError:
                    pass
            return out

        while alive() and time.time() < deadline:
            time.sleep(0.1)
        assert not alive()
    finally:
        if p.poll() is None:
            p.kill()


def test_resume_choice_latest_first_and_a_requeued_run_prefers_its_own_save(tmp_path):
    from megaspark.checkpoint_files import find_resumable
    from megaspark.training.checkpointing import choose_resume

    run = tmp_path / "run"
    for it in (2, 4, 6):
        _real(run, it)
    (run / "latest").write_text("iter_0000004")  # rolled back by hand: honoured
    assert find_resumable(str(run))[0] == str(run / "iter_0000004")
    start = tmp_path / "start"
    _real(start, 9)
    assert choose_resume(CheckpointConfig(load=str(start), save=str(run), auto_resume=True)) == str(run / "iter_0000004")  # the run's own checkpoints win
    assert choose_resume(CheckpointConfig(load=str(start), save=str(tmp_path / "fresh"), auto_resume=True)) \
        == str(start / "iter_0000009")
    assert choose_resume(CheckpointConfig(load=None, save=str(run), auto_resume=False)) is None
    assert choose_resume(CheckpointConfig(load=str(start), save=str(run), auto_resume=False)) \
        == str(start / "iter_0000009")

#!/usr/bin/env python
"""Fault-injection suite: a short DSpark training run (torchrun, CPU, gloo, DP=2 by
default) interrupted in every way a cluster interrupts it, then restarted with the same
command line (auto-resume) until it finishes. Each case must end in the same final
checkpoint, model and optimizer tensors bit for bit (fp32), as one uninterrupted run.

Cases (each with ``--points`` random points, chained in one run: the run is interrupted
at the first point, restarted, interrupted at the second, ...):

* ``sigterm``   SIGTERM to one random rank at a random step (``--exit-signal-handler``):
                every rank finishes the step, saves, exits 0;
* ``budget``    ``--exit-duration-in-mins`` spent: save after the step, exit 0 (one point);
* ``sigkill``   SIGKILL of one random rank at a random step or inside a checkpoint save
                (after the shards, the state file, the manifest, before the rename);
* ``enospc``    "No space left on device" raised on one rank while a checkpoint is
                written: every rank stops, nothing is renamed, the error names the
                checkpoint that stays usable;
* ``truncate``  the newest checkpoint truncated or corrupted after a stop: the restart
                reports it and resumes from the previous one.

And three that end differently by design: ``nan`` (a NaN in one micro-batch on one DP
rank: every rank skips that step with ``--skip-nonfinite-steps``, or every rank stops in
it without), and ``hang`` (a rank stops responding: the other reports it within
``--distributed-timeout-minutes``).

    python tools/fault_suite.py --target-model TARGET --data-path DATA --workdir /tmp/faults
    python tools/fault_suite.py ... --cases sigterm,truncate --points 3 --seed 7 --json out.json

Prints one table row per interruption and per case; exit status 0 when every case passed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megaspark.checkpoint_files import verify_checkpoint  # noqa: E402
ALL_CASES = ("sigterm", "budget", "sigkill", "enospc", "truncate", "nan", "hang")
KILL_POINTS = ("step", "save-shards", "save-state", "save-manifest", "save-rename")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(parent: int) -> dict:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                out[int(env[b"RANK"])] = int(d)
        except (OSError, ValueError, IndexError):
            continue
    return out


def logged_iteration(log: Path, offset: int = 0) -> int:
    """The newest training iteration logged after byte ``offset`` (0: none yet)."""
    if not log.exists():
        return 0
    it = 0
    with open(log) as f:
        f.seek(offset)
        text = f.read()
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind", "train") == "train" and "iteration" in rec:
            it = max(it, int(rec["iteration"]))
    return it


class Suite:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir)
        self.rows = []  # (case, point, expected, observed, ok)
        self.iters = args.train_iters

    # ------------------------------------------------------------------ launching
    def flags(self, save: Path, log: Path, *extra) -> list:
        a = self.args
        return ["--target-model", a.target_model, "--data-path", a.data_path, "--num-layers", "2",
                "--block-size", "4", "--num-anchors", "6", "--markov-rank", "8", "--seq-length", "64",
                "--micro-batch-size", "1", "--global-batch-size", str(2 * a.nproc), "--num-target-taps", "2",
                "--lr", "2e-3", "--lr-warmup-fraction", "0", "--log-interval", "1", "--no-progress-bar",
                "--train-iters", str(self.iters), "--save", str(save), "--save-interval", "2",
                "--keep-last", str(self.iters), "--log-jsonl", str(log), *extra]

    def launch(self, flags, env=None, signal_at=None, timeout=600):
        """Run torchrun; ``signal_at=(iteration, rank, sig)`` sends ``sig`` to that rank once
        the log shows the iteration. Returns (returncode, stdout, stderr, seconds)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.args.nproc),
               "--master-port", str(free_port()), str(REPO / "pretrain_dspark.py"), *flags]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        log = Path(flags[flags.index("--log-jsonl") + 1])
        offset = log.stat().st_size if log.exists() else 0  # this launch's records only
        t0 = time.time()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env, cwd=REPO)
            sent = False
            while proc.poll() is None:
                if time.time() - t0 > timeout:
                    proc.kill()
                    break
                if signal_at and not sent and logged_iteration(log, offset) >= signal_at[0]:
                    pid = worker_pids(proc.pid).get(signal_at[1])
                    if pid:
                        os.kill(pid, signal_at[2])
                        sent = True
                time.sleep(0.05)
            rc = proc.wait()
            out.seek(0)
            err.seek(0)
            return rc, out.read(), err.read(), time.time() - t0

    def row(self, case, point, expected, observed, ok) -> bool:
        self.rows.append((case, point, expected, observed, bool(ok)))
        return bool(ok)

    # ------------------------------------------------------------------ final weights
    def final_tensors(self, save: Path) -> dict:
        import torch
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        ckpt = save / f"iter_{self.iters:07d}"
        with tempfile.TemporaryDirectory() as d:
            dcp_to_torch_save(str(ckpt), f"{d}/all.pt")
            sd = torch.load(f"{d}/all.pt", weights_only=False)

        def walk(x, p=""):
            for k, v in x.items():
                if isinstance(v, dict):
                    yield from walk(v, f"{p}{k}.")
                elif isinstance(v, torch.Tensor):
                    yield f"{p}{k}", v
        out = dict(walk(sd))
        for f in sorted(ckpt.glob("rng_rank*.pt")):
            out[f.name] = torch.load(f, weights_only=False)["cpu"]
        return out

    def same_as_baseline(self, case: str, save: Path) -> bool:
        import torch

        if not (save / f"iter_{self.iters:07d}").is_dir():
            return self.row(case, "final", "same weights as uninterrupted", "no final checkpoint", False)
        got = self.final_tensors(save)
        diff = sorted(k for k in set(got) | set(self.baseline)
                      if k not in got or k not in self.baseline or not torch.equal(got[k], self.baseline[k]))
        return self.row(case, "final", f"{len(self.baseline)} tensors bit-identical to uninterrupted",
                        "identical" if not diff else f"{len(diff)} differ (e.g. {diff[0]})", not diff)

    # ------------------------------------------------------------------ cases
    def run_baseline(self) -> None:
        save, log = self.work / "baseline", self.work / "baseline.jsonl"
        rc, out, err, _ = self.launch(self.flags(save, log))
        if rc != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{out[-3000:]}\n{err[-3000:]}")
        self.baseline = self.final_tensors(save)

    def finish(self, case, save, log) -> bool:
        rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler"))
        self.row(case, "restart to the end", "resumes, exit 0", f"exit {rc}", rc == 0 and "resuming from" in out)
        return self.same_as_baseline(case, save)

    def resume_point(self, save: Path) -> int:
        """The iteration a restart resumes from: the newest checkpoint that verifies (0: none)."""
        done = [int(d.name[5:]) for d in save.glob("iter_*") if d.name[5:].isdigit()
                and verify_checkpoint(str(d)) is None] if save.is_dir() else []
        return max(done, default=0)

    def signal_step(self, save: Path, launches_left: int) -> int:
        """A random step for a signal in the next launch: after the iteration it resumes from
        (a step already done is never logged again, so the signal would land late), and early
        enough to leave each later launch two iterations (the signal lands during the step
        after the logged one, which is where the run stops)."""
        lo = self.resume_point(save) + 1
        hi = max(lo, self.iters - 2 * launches_left)
        return self.rng.randint(lo, hi)

    def case_sigterm(self) -> None:
        save, log = self.work / "sigterm", self.work / "sigterm.jsonl"
        for i in range(self.args.points):
            step = self.signal_step(save, self.args.points - i)
            rank = self.rng.randrange(self.args.nproc)
            rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler"),
                                          signal_at=(step, rank, signal.SIGTERM))
            latest = (save / "latest").read_text() if (save / "latest").exists() else "-"
            ok = rc == 0 and "received SIGTERM" in out and "stopped at iteration" in out
            self.row("sigterm", f"step {step}, rank {rank}", "saves, exit 0", f"exit {rc}, latest {latest}", ok)
        self.finish("sigterm", save, log)

    def case_budget(self) -> None:
        save, log = self.work / "budget", self.work / "budget.jsonl"
        rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler",
                                                 "--exit-duration-in-mins", "0.001"))
        latest = (save / "latest").read_text() if (save / "latest").exists() else "-"
        ok = rc == 0 and "--exit-duration-in-mins 0.001 reached: stopped at iteration 1" in out
        self.row("budget", "--exit-duration-in-mins 0.001 (spent at start-up)", "saves after the first step, exit 0",
                 f"exit {rc}, latest {latest}", ok)
        self.finish("budget", save, log)

    def case_sigkill(self) -> None:
        save, log = self.work / "sigkill", self.work / "sigkill.jsonl"
        points = sorted(self.rng.sample(range(2, self.iters), self.args.points))
        for it in points:
            rank = self.rng.randrange(self.args.nproc)
            where = self.rng.choice(KILL_POINTS[1:] if it % 2 == 0 else KILL_POINTS[:1])
            if where == "save-manifest":  # rank 0 writes the manifest
                rank = 0
            # from outside, at whatever point it lands (not in the last step: the run could end first)
            if where == "step" and it < self.iters - 1 and self.rng.random() < 0.5:
                label = f"SIGKILL from outside at step {it}, rank {rank}"
                rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler"),
                                              signal_at=(it, rank, signal.SIGKILL))
            else:
                label = f"{where} of iteration {it}, rank {rank}"
                rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler"),
                                              env={"MEGASPARK_FAULT": f"kill:{where}:{it}:{rank}"})
            after = (save / "latest").read_text() if (save / "latest").exists() else None
            intact = after is None or verify_checkpoint(str(save / after)) is None
            ok = rc != 0 and intact
            self.row("sigkill", label, "dies; latest stays intact", f"exit {rc}, latest {after or '-'}", ok)
        self.finish("sigkill", save, log)

    def case_enospc(self) -> None:
        save, log = self.work / "enospc", self.work / "enospc.jsonl"
        saves = list(range(2, self.iters, 2))
        for it in sorted(self.rng.sample(saves, min(self.args.points, len(saves)))):
            where = self.rng.choice(("save-state", "save-manifest"))
            rank = 0 if where == "save-manifest" else self.rng.randrange(self.args.nproc)
            rc, out, err, _ = self.launch(self.flags(save, log, "--exit-signal-handler"),
                                          env={"MEGASPARK_FAULT": f"enospc:{where}:{it}:{rank}"})
            ok = (rc != 0 and "No space left on device" in err and "nothing was renamed or deleted" in err
                  and not (save / f"iter_{it:07d}").exists() and not (save / f"iter_{it:07d}.tmp").exists())
            self.row("enospc", f"{where} of iteration {it}, rank {rank}",
                     "stops; previous checkpoint named and usable",
                     f"exit {rc}: " + (err.split("nothing was renamed or deleted: ", 1)[-1].splitlines()[0][-70:]
                                       if "nothing was renamed" in err else "?"), ok)
        self.finish("enospc", save, log)

    def case_truncate(self) -> None:
        save, log = self.work / "truncate", self.work / "truncate.jsonl"
        damaged = None  # (checkpoint, file, how) damaged after the previous launch
        for i in range(self.args.points + 1):
            # the first stop leaves two checkpoints, so the damaged newest has one to fall back to
            step = None if i == self.args.points else max(3, self.signal_step(save, self.args.points - i))
            flags = self.flags(save, log, "--exit-signal-handler")
            signal_at = None if step is None else (step, self.rng.randrange(self.args.nproc), signal.SIGTERM)
            rc, out, err, _ = self.launch(flags, signal_at=signal_at)
            if damaged is not None:
                ckpt, victim, how = damaged
                ok = rc == 0 and f"not usable, skipped: {ckpt}: file {victim}" in out and "resuming from" in out
                self.row("truncate", f"{Path(ckpt).name}/{victim} {how}",
                         "restart reports it, resumes from the previous", "fell back" if ok else f"exit {rc}", ok)
            if step is None:
                self.row("truncate", "restart to the end", "resumes, exit 0", f"exit {rc}", rc == 0)
                break
            newest = save / (save / "latest").read_text()
            files = sorted(json.loads((newest / "checksums.json").read_text())["files"])
            victim = self.rng.choice(files)
            data = (newest / victim).read_bytes()
            if self.rng.random() < 0.5:
                (newest / victim).write_bytes(data[: self.rng.randrange(len(data))])
                how = "truncated"
            else:
                pos = self.rng.randrange(len(data))
                (newest / victim).write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:])
                how = "one byte flipped"
            damaged = (str(newest), victim, how)
        self.same_as_baseline("truncate", save)

    def case_nan(self) -> None:
        it, rank = self.rng.randrange(2, self.iters - 1), self.rng.randrange(self.args.nproc)
        env = {"MEGASPARK_FAULT": f"nan:loss:{it}:{rank}"}
        save, log = self.work / "nan-skip", self.work / "nan-skip.jsonl"
        rc, out, err, _ = self.launch(self.flags(save, log, "--skip-nonfinite-steps", "1"), env=env)
        skipped = out.count(f"iteration {it} skipped: a non-finite loss")
        ok = rc == 0 and skipped == self.args.nproc and f"(rank {rank}, micro-batch 0)" in out
        self.row("nan", f"iteration {it}, rank {rank}, --skip-nonfinite-steps 1",
                 "every rank skips that step", f"exit {rc}, {skipped} ranks skipped {it}", ok)
        save, log = self.work / "nan-stop", self.work / "nan-stop.jsonl"
        rc, out, err, _ = self.launch(self.flags(save, log), env=env)
        stops = out.count(f"stopping in iteration {it} (non-finite)")
        latest = (save / "latest").read_text() if (save / "latest").exists() else "-"
        ok = (rc != 0 and stops == self.args.nproc and latest < f"iter_{it:07d}"
              and f"error: iteration {it}: a non-finite loss" in err)
        self.row("nan", f"iteration {it}, rank {rank}, no skips", "every rank stops in that step, saves nothing",
                 f"exit {rc}, {stops} ranks stopped, latest {latest}", ok)

    def case_hang(self) -> None:
        minutes = self.args.hang_timeout_minutes
        it, rank = self.rng.randrange(2, self.iters - 1), self.rng.randrange(1, self.args.nproc)
        save, log = self.work / "hang", self.work / "hang.jsonl"
        rc, out, err, secs = self.launch(self.flags(save, log, "--distributed-timeout-minutes", str(minutes)),
                                         env={"MEGASPARK_FAULT": f"hang:step:{it}:{rank}"})
        ended = time.time()
        hung = re.search(r"injected hang at step of iteration \d+ \(t=([0-9.]+)\)", out)
        delay = ended - float(hung.group(1)) if hung else float("inf")
        ok = (rc != 0 and "timed out after --distributed-timeout-minutes" in err and f"iteration {it}" in err
              and delay <= 60 * minutes + 30)  # + the launcher's shutdown of the hung rank
        msg = next((l.split("error: ", 1)[1] for l in err.splitlines() if "timed out" in l and "error: " in l), "?")
        self.row("hang", f"rank {rank} stops responding at iteration {it}",
                 f"reported within {minutes:g} min", f"exit {rc}, {delay:.0f}s after the hang: {msg[:70]}", ok)

    # ------------------------------------------------------------------ report
    def table(self) -> str:
        heads = ("case", "point", "expected", "observed", "result")
        rows = [(c, p, e, o, "PASS" if ok else "FAIL") for c, p, e, o, ok in self.rows]
        widths = [max(len(str(r[i])) for r in rows + [heads]) for i in range(5)]
        line = lambda r: " | ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
        return "\n".join([line(heads), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fault_suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--target-model", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--workdir", required=True, help="emptied, then holds every run's checkpoints")
    p.add_argument("--cases", default=",".join(ALL_CASES))
    p.add_argument("--points", type=int, default=3, help="random interruption points per case")
    p.add_argument("--nproc", type=int, default=2, help="ranks (data parallel)")
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--hang-timeout-minutes", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=None, help="random points (default: a fresh seed, printed)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(ALL_CASES)}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    suite = Suite(args)
    print(f"fault suite: seed {args.seed}, {args.nproc} ranks, {args.train_iters} iterations, cases {cases}", flush=True)
    if set(cases) & {"sigterm", "budget", "sigkill", "enospc", "truncate"}:
        suite.run_baseline()
    for c in cases:
        getattr(suite, f"case_{c}")()
        print(f"  {c}: {'PASS' if all(ok for cc, *_, ok in suite.rows if cc == c) else 'FAIL'}", flush=True)
    print(suite.table())
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": suite.rows}, indent=1))
    failed = [r for r in suite.rows if not r[4]]
    print(f"{len(suite.rows) - len(failed)}/{len(suite.rows)} rows passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

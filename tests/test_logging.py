"""megaspark/training/logging.py: one write per console line (ranks share one pipe), the
console line and the JSONL record of a step."""

from __future__ import annotations

import io
import json
import math

from megaspark.arguments.configs import LoggingConfig
from megaspark.training.logging import MetricsLogger, print_line


class _Writes(io.StringIO):
    """A stream that records every ``write`` call, as an unbuffered pipe passes them on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, s):
        self.calls.append(s)
        return super().write(s)


def test_print_line_is_one_write_so_ranks_never_interleave_mid_line():
    out = _Writes()
    print_line("rank 1: target HFTargetProvider built on cpu in torch.float32", file=out)
    assert out.calls == ["rank 1: target HFTargetProvider built on cpu in torch.float32\n"]
    plain = _Writes()
    print("x", file=plain)  # what print_line replaces: text and newline as two writes
    assert len(plain.calls) == 2


def test_console_line_and_jsonl_record(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    logger = MetricsLogger(LoggingConfig(log_jsonl=str(log), progress_bar=False), enabled=True, train_iters=20)
    logger.log_train(3, {"loss": 1.25, "tau": 2.5, "lr": 1e-4, "grad_norm": float("nan"), "eta_sec": 3725.0,
                         "tokens": 10})
    logger.log_eval(3, {"loss": 1.5, "tau": 2.0, "accept_rate@2": 0.25, "accept_rate@10": 0.125,
                        "accept_rate@1": 0.5})
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "iter      3/20 | loss 1.2500 | tau 2.500 | lr 1.000e-04 | grad-norm nan | eta 1:02:05"
    assert out[1] == "eval @ 3: loss 1.5000 | tau 2.000 | accept@k 0.50 0.25 0.12"
    train, evals = [json.loads(l) for l in log.read_text().splitlines()]
    assert (train["kind"], train["iteration"], train["loss"], train["tokens"]) == ("train", 3, 1.25, 10)
    assert train["grad_norm"] is None  # non-finite values are written as null, not NaN
    assert evals["kind"] == "eval" and math.isclose(evals["accept_rate@10"], 0.125)


def test_disabled_logger_prints_and_writes_nothing(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    logger = MetricsLogger(LoggingConfig(log_jsonl=str(log)), enabled=False, train_iters=5)
    logger.log_train(1, {"loss": 1.0})
    logger.close()
    assert capsys.readouterr().out == "" and not log.exists()

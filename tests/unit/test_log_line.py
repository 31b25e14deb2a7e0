"""What a person reads (one compact line per logging step, human units) and what a program
reads (metrics.jsonl: one object per logging step, every field TensorBoard gets)."""
import json
import logging
import math

import pytest

from disttrain.observe.logs import duration, si, step_line
from disttrain.observe.metrics import TensorBoard
from disttrain.observe.progress import Progress, bar_info

FIELDS = {"loss": 0.029612, "samples_per_s": 12913.0, "time_step_s": 0.00242, "time_comm_s": 0.001355,
          "data_wait_s": 0.0000968, "mfu": 0.0312, "peak_mem_gb": 0.42 * 2**30 / 1e9, "lr": 0.05,
          "time_compute_s": 0.0009, "flops_per_step": 1.2e7}


def test_the_line_of_the_issue():
    assert step_line(120, 200, FIELDS) == ("step 120/200  loss 0.02961  12.9k samples/s  2.42 ms/step "
                                           "(comm 56%, data 4%)  mfu 3.12%  mem 0.42 GiB")


def test_fields_that_are_missing_are_left_out():
    assert step_line(3, 10, {"loss": 0.5, "samples_per_s": 1234.0}) == "step 3/10  loss 0.5  1.23k samples/s"
    assert step_line(3, 10, {}) == "step 3/10"
    assert step_line(7, 9, {"loss": math.nan}) == "step 7/9  loss nan"
    tokens = step_line(1, 2, {"samples_per_s": 10.0, "tokens_per_s": 2.5e6, "time_step_s": 0.3})
    assert tokens == "step 1/2  10 samples/s  2.5M tokens/s  300 ms/step"


@pytest.mark.parametrize("value,text", [(12913, "12.9k"), (999, "999"), (2.5e6, "2.5M"), (3.2e9, "3.2G"), (0.5, "0.5")])
def test_si(value, text):
    assert si(value) == text


@pytest.mark.parametrize("seconds,text", [(0.0024, "2.4 ms"), (1.52, "1.52 s"), (0.00031, "310 us")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_log_mode_prints_one_line_per_logging_step(caplog):
    progress = Progress(total=20, start=0, mode="log")
    with caplog.at_level(logging.INFO, logger="disttrain"):
        progress.update(9, {}, logged=False)
        progress.update(10, FIELDS, logged=True)
    progress.close()
    assert [r.getMessage() for r in caplog.records] == [step_line(10, 20, FIELDS)]
    assert bar_info(FIELDS) == "loss 0.02961  12.9k samples/s"


def test_metrics_jsonl_holds_every_scalar_once_per_logging_step(tmp_path):
    from disttrain.observe.report import read_scalars

    board = TensorBoard(tmp_path, enabled=True)
    board.scalars(0, {"restart_count": 0.0}, prefix="fault")          # before the first step
    board.scalars(10, {"time_step_s": 0.002}, prefix="rank0")         # the observer, then the loop
    board.scalars(10, {"loss": 0.5, "samples_per_s": 100.0})
    board.scalars(10, {"loss": 0.6}, prefix="val")                    # evaluation after the step
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # written at once, not at close
    board.scalars(20, {"loss": math.inf, "samples_per_s": 90.0})
    board.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record.pop("time") > 0
    assert records == [{"step": 0, "fault/restart_count": 0.0},
                       {"step": 10, "loss": 0.5, "samples_per_s": 100.0, "rank0/time_step_s": 0.002},
                       {"step": 10, "val/loss": 0.6},
                       {"step": 20, "loss": None, "samples_per_s": 90.0}]
    tags = read_scalars(tmp_path)  # the same figures in TensorBoard
    assert tags["train/loss"] == [(10, 0.5), (20, math.inf)] and tags["rank0/time_step_s"] == [(10, pytest.approx(0.002))]
    assert tags["val/loss"] == [(10, pytest.approx(0.6))] and tags["fault/restart_count"] == [(0, 0.0)]


def test_other_ranks_write_nothing(tmp_path):
    board = TensorBoard(tmp_path, enabled=False)
    board.scalars(1, {"loss": 1.0})
    board.close()
    assert list(tmp_path.iterdir()) == []

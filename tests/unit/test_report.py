"""`disttrain report` on a real pipeline run dir: PNGs that decode at the right size and
are not blank, and a timeline whose boxes are exactly the recorded events."""
import json

import numpy as np
from PIL import Image

from observe_runs import pipeline_run

from disttrain.observe.report import DPI, FIGSIZE, _figure, draw_timeline, load_timeline, main


def test_report_writes_pictures(tmp_path, capsys):
    run_dir = pipeline_run()
    out = tmp_path / "report"
    assert main([str(run_dir), "--out", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    names = {p.name for p in out.glob("*.png")}
    assert names == {"loss.png", "throughput_mfu.png", "step_split.png", "timeline_pipeline.png"}
    for path in out.glob("*.png"):
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert image.shape == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI), 3)
        assert image.std() > 10, f"{path.name} looks blank"
        assert (image.reshape(-1, 3) < 200).any(axis=1).mean() > 0.01  # ink: lines, bars, boxes


def test_timeline_boxes_match_recorded_events():
    run_dir = pipeline_run()
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "timeline").glob("step6_rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    raw = [e for r in records for e in r["events"]]
    # GPipe, 2 stages x 4 micro-batches: one forward and one backward each
    assert sorted((e["stage"], e["kind"], e["micro"]) for e in raw) == sorted(
        (s, k, m) for s in (0, 1) for k in "FB" for m in range(4))
    events = load_timeline(run_dir)
    fig, (ax,) = _figure()
    boxes = draw_timeline(ax, events)
    origin = min(r["step_start"] for r in records)
    for box, event in zip(boxes, raw):
        assert box.get_x() == np.float64((event["start"] - origin) * 1e3)
        assert abs(box.get_width() - (event["end"] - event["start"]) * 1e3) < 1e-6
        assert box.get_y() == event["stage"] - 0.4
    # GPipe order on each stage: every forward before any backward
    for stage in (0, 1):
        mine = [e for e in raw if e["stage"] == stage]
        last_f = max(e["end"] for e in mine if e["kind"] == "F")
        assert all(e["start"] >= last_f for e in mine if e["kind"] == "B")


def test_report_rejects_a_dir_without_scalars(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no TensorBoard scalars" in capsys.readouterr().err

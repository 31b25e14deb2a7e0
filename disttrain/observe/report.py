"""``disttrain report <run dir> [<run dir>...] [--out DIR]``: PNG pictures of runs, read back
from their TensorBoard event files (and pipeline timelines): loss curves, throughput and
MFU over time, the step-time split, and the measured pipeline schedule.

Matplotlib with the Agg backend: files only, no display needed on a cluster node.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIGSIZE, DPI = (8.0, 4.5), 100  # 800 x 450 pixels
SPLIT = (("time_compute_s", "compute", "tab:blue"), ("time_comm_s", "communication", "tab:red"),
         ("time_idle_s", "idle", "tab:gray"))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's TensorBoard files: tag -> [(step, value)] by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in out.items()}


def _figure(rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=FIGSIZE, dpi=DPI, squeeze=False, sharex=rows > 1)
    return fig, [a[0] for a in axes]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI
    plt.close(fig)
    return path


def _plot(ax, points, label: str, **style) -> bool:
    if not points:
        return False
    ax.plot([s for s, _ in points], [v for _, v in points], label=label, **style)
    return True


def loss_figure(runs: dict[str, dict], out: Path) -> Path:
    fig, (ax,) = _figure()
    for name, tags in runs.items():
        _plot(ax, tags.get("train/loss"), f"{name} train")
        _plot(ax, tags.get("val/loss") or tags.get("eval/loss"), f"{name} validation", linestyle="--")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend(fontsize=8)
    return _save(fig, out / "loss.png")


def throughput_figure(runs: dict[str, dict], out: Path) -> Path:
    fig, (top, bottom) = _figure(2)
    for name, tags in runs.items():
        _plot(top, tags.get("train/samples_per_s"), f"{name} samples/s")
        _plot(top, tags.get("train/tokens_per_s"), f"{name} tokens/s", linestyle=":")
        _plot(bottom, tags.get("train/mfu"), name)
    top.set(ylabel="per second", title="throughput (all ranks) and model FLOPs utilisation")
    bottom.set(xlabel="step", ylabel="MFU")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    return _save(fig, out / "throughput_mfu.png")


def split_figure(runs: dict[str, dict], out: Path) -> Path:
    """Stacked bars: mean compute / communication / idle seconds per step, per run, as
    averaged over the ranks on the last logged step (the first includes warm-up)."""
    fig, (ax,) = _figure()
    names = list(runs)
    for i, name in enumerate(names):
        bottom = 0.0
        for tag, label, color in SPLIT:
            points = runs[name].get(f"train/{tag}") or [(0, 0.0)]
            value = points[-1][1] * 1e3
            ax.bar(i, value, bottom=bottom, color=color, label=label if i == 0 else None)
            bottom += value
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(ylabel="ms per step", title="step time split (mean over ranks, last logged interval)")
    ax.legend(fontsize=8)
    return _save(fig, out / "step_split.png")


def load_timeline(run_dir: Path) -> list[dict]:
    """The recorded events of the latest recorded step, all ranks, as dicts."""
    files = sorted(Path(run_dir, "timeline").glob("step*_rank*.json"))
    records = [json.loads(f.read_text()) for f in files]
    if not records:
        return []
    step = max(r["step"] for r in records)
    records = [r for r in records if r["step"] == step]
    origin = min(r["step_start"] for r in records)
    return [{**e, "start": e["start"] - origin, "end": e["end"] - origin} for r in records for e in r["events"]]


def draw_timeline(ax, events: list[dict]) -> list:
    """One row per stage, one box per micro-batch forward (F) or backward (B); returns the
    boxes, in the order of ``events``. Gaps between boxes are the stage's idle time."""
    from matplotlib.patches import Rectangle

    boxes = []
    for e in events:
        color = "tab:blue" if e["kind"] == "F" else "tab:orange"
        box = Rectangle((e["start"] * 1e3, e["stage"] - 0.4), (e["end"] - e["start"]) * 1e3, 0.8,
                        facecolor=color, edgecolor="black", linewidth=0.5)
        ax.add_patch(box)
        ax.text(e["start"] * 1e3 + (e["end"] - e["start"]) * 5e2, e["stage"], f"{e['kind']}{e['micro']}",
                ha="center", va="center", fontsize=6, color="white")
        boxes.append(box)
    stages = sorted({e["stage"] for e in events})
    ax.set_xlim(0, max(e["end"] for e in events) * 1e3 * 1.02)
    ax.set_ylim(max(stages) + 0.6, min(stages) - 0.6)
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.set_xlabel("ms since the step started")
    return boxes


def timeline_figure(name: str, run_dir: Path, out: Path) -> Path | None:
    events = load_timeline(run_dir)
    if not events:
        return None
    fig, (ax,) = _figure()
    draw_timeline(ax, events)
    ax.set_title(f"{name}: measured pipeline schedule (F forward, B backward; gaps = idle)")
    return _save(fig, out / f"timeline_{name}.png")


def make_report(run_dirs: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    runs = {_name(d, run_dirs): read_scalars(d) for d in run_dirs}
    missing = [str(d) for d, tags in zip(run_dirs, runs.values()) if not tags]
    if missing:
        raise ValueError(f"no TensorBoard scalars under {', '.join(missing)}/tensorboard: give run directories "
                         "of finished or running trainings")
    paths = [loss_figure(runs, out), throughput_figure(runs, out), split_figure(runs, out)]
    paths += [p for d in run_dirs if (p := timeline_figure(_name(d, run_dirs), d, out))]
    return paths


def _name(run_dir: Path, all_dirs: list[Path]) -> str:
    names = [Path(d).name for d in all_dirs]
    return Path(run_dir).name if names.count(Path(run_dir).name) == 1 else str(run_dir).strip("/").replace("/", "_")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="output folder (default: <first run dir>/report)")
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.run_dirs, args.out or args.run_dirs[0] / "report")
    except ValueError as exc:
        print(f"disttrain report: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

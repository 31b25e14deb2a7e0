"""The code a model's training step pages in: on CPU, the run's memory figure is the growth
of the resident set (``observe.memory.TrainingMemory``), and the resident set counts the
pages of shared libraries a process has executed, not only its tensors. The first forward,
backward and optimizer step of a model fault in the machine code of every kernel they use
(libtorch_cpu.so: embedding, layer norm, attention, GELU, log-softmax / NLL, AdamW, ...);
those pages stay resident and count like tensor bytes.

The host calibration (``plan.host.TINY``: a tiny Linear/ReLU/MSE/SGD model) already counts
its own kernels' pages in the framework term (about 5 MB). A model with other kernels pages
in more: measured here, ``gpt_tiny`` pages in 15.6 MB of libtorch_cpu.so over its first two
steps against the tiny model's 5.3 MB, which is the ~10 MB the GPT rows missed.

``extra_code_bytes`` measures the difference: two fresh processes, each builds one model
(the run's, then the calibration's), its optimizer, loss and data loader, and reports how
much file-backed resident memory (``RssFile``: code and mapped files such as the text
corpus's shards) two training steps add. Cached per host, thread count and model/data
config; 0 on GPUs, where memory is the allocator's and code is not in it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

STEPS = 2  # AdamW's state and its update kernels are first used in step 1; step 2 pages in nothing new
#: the config sections that decide which kernels a single-process step runs
SECTIONS = ("model", "optim", "loss", "data", "memory", "trainer")


def file_resident() -> int:
    """File-backed resident bytes of this process (``RssFile``: executed code, mapped files)."""
    from disttrain.observe.memory import _vm_field

    return _vm_field("RssFile") or 0


def step_pages(cfg: DictConfig, threads: int, steps: int = STEPS) -> int:
    """File-backed resident bytes ``steps`` training steps of ``cfg``'s model add in this
    process, after the model, optimizer and loader are built (as ``TrainingMemory`` starts
    counting after the run's set-up)."""
    from disttrain.engine import builders

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = builders.model_builder(cfg)()
    optimizer = builders.optimizer_builder(cfg)(model.parameters())
    loss_fn = builders.build_loss(cfg)
    loader, _ = builders.build_loader(cfg, builders.build_dataset(cfg), (0, 1))
    batches = iter(loader)
    start = file_resident()
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return max(file_resident() - start, 0)


def _spec(cfg: DictConfig) -> dict:
    spec = {}
    for key in SECTIONS:
        if key in cfg:
            try:
                spec[key] = OmegaConf.to_container(cfg[key], resolve=True)
            except Exception:  # an interpolation outside these sections: keep it as written
                spec[key] = OmegaConf.to_container(cfg[key], resolve=False)
    return spec


def _measure(spec: dict, threads: int, timeout: float = 300) -> int:
    """``step_pages`` of ``spec`` in a fresh process (this one has long paged in everything)."""
    from disttrain.plan.host import MALLOC

    with tempfile.TemporaryDirectory(prefix="disttrain-plan-pages-") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **MALLOC}
        proc = subprocess.run([sys.executable, "-m", "disttrain.plan.pages", str(path), str(threads)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"plan: measuring the model's code pages failed:\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["file_b"])


def extra_code_bytes(cfg: DictConfig, tiny: DictConfig, threads: int) -> tuple[float, str]:
    """(bytes of code ``cfg``'s model step pages in beyond the host calibration's model
    ``tiny`` (``plan.host.TINY`` composed), where the figure comes from). Measured once per
    host / threads / model+data config, cached next to the host terms (``plan.host.cache_file``)."""
    from disttrain.plan import host

    if torch.cuda.is_available():
        return 0.0, "GPU: code is not in the allocator's peak"
    spec = _spec(cfg)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    entry, where = host.cached(f"{host._key(1, threads, 'code pages')}|{digest}",
                               lambda: {"model_b": _measure(spec, threads), "tiny_b": _measure(_spec(tiny), threads)})
    extra = max(entry["model_b"] - entry["tiny_b"], 0.0)
    return float(extra), (f"model's kernels page in {entry['model_b'] / 1e6:.1f} MB of code, the calibration's "
                          f"{entry['tiny_b'] / 1e6:.1f} MB ({where})")


def _main(argv: list[str]) -> None:
    import disttrain.config.resolvers  # noqa: F401  (the project's interpolations, if any are left)

    cfg = OmegaConf.create(json.loads(Path(argv[0]).read_text()))
    print(json.dumps({"file_b": step_pages(cfg, int(argv[1]))}))


if __name__ == "__main__":
    _main(sys.argv[1:])

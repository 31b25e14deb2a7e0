"""``disttrain export RUN_DIR [--step N] [--format safetensors|pt] [--out FILE]``: one file with
the full model of any strategy's checkpoint, for serving, sharing or another framework.

safetensors (the default) is written tensor by tensor: the header is computed from the DCP
metadata (every tensor's dtype and global shape), then each tensor is read alone from the
checkpoint's shards (DCP reassembles it) and appended, so peak memory is about the largest
tensor, not the model. safetensors' own writer takes a complete dict of tensors, which is the
whole model in memory at once; the format is a documented header plus raw bytes, written here
by hand for that reason. ``pt`` is a torch.save of the state dict (whole model in memory).
"""
from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Iterator

import torch

from disttrain.config.errors import ConfigError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
PREFIX = "model."


def model_tensors(directory: Path) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """The model's tensors in a DCP checkpoint: name (the unsplit model's FQN) -> dtype, shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key[len(PREFIX):]: (meta.properties.dtype, meta.size) for key, meta in sorted(metadata.items())
            if key.startswith(PREFIX) and isinstance(meta, TensorStorageMetadata)}


def read_one(directory: Path, name: str, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """One full tensor out of a (possibly sharded) DCP checkpoint, in this process alone."""
    import torch.distributed.checkpoint as dcp

    holder = {"model": {name: torch.empty(shape, dtype=dtype)}}
    dcp.load(holder, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return holder["model"][name]


def iter_model(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for name, (dtype, shape) in model_tensors(directory).items():
        yield name, read_one(directory, name, dtype, shape)


def write_safetensors(directory: Path, out: Path, metadata: dict[str, str]) -> None:
    tensors = model_tensors(directory)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        if dtype not in _DTYPES:
            raise ConfigError(f"{name} has dtype {dtype}, which safetensors cannot hold: use --format pt.")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, (dtype, shape) in tensors.items():
            tensor = read_one(directory, name, dtype, shape).contiguous()
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    tmp.replace(out)


def export(run_dir: str | Path, step: int | None = None, fmt: str = "safetensors", out: str | Path | None = None) -> Path:
    from disttrain.checkpoint.commit import CheckpointError, checkpoint_dir, load_model_state

    if fmt not in ("safetensors", "pt"):
        raise ConfigError(f"--format {fmt} must be safetensors or pt.")
    try:
        directory = checkpoint_dir(run_dir, step)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(out) if out else Path(run_dir) / f"model_{directory.name}.{fmt}"
    step_text = directory.name.split("_")[-1].lstrip("0") or "0"
    if (directory / "native.json").is_file() or fmt == "pt":  # an engine's own format: its reader, in memory
        state = load_model_state(run_dir, step)
        if fmt == "pt":
            torch.save(state, out)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"step": step_text})
        return out
    write_safetensors(directory, out, {"step": step_text, "format": "pt"})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the newest intact)")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "pt"))
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/model_step_N.FORMAT)")
    args = parser.parse_args(argv)
    path = export(args.run_dir, args.step, args.format, args.out)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0

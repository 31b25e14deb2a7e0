"""``trainer.compile``: torch.compile applied to each block of what a rank keeps.

Where it sits in the engine's order: activation checkpointing has already replaced the
blocks' ``forward``, so the compiled graph contains the recomputation (dynamo traces the
non-reentrant checkpoint); FSDP2's ``fully_shard`` comes after, so its all-gather and
reduce-scatter hooks run eagerly around each compiled block (torchtitan's order).

We compile the block's ``forward`` function and bind it back onto the instance instead of
wrapping the block (``torch.compile(module)`` returns an ``OptimizedModule`` whose parameter
names gain ``_orig_mod.``), so checkpoints, tensor-parallel plans and ``load_model_state``
see the same names with compile on or off. ``nn.Module.compile()`` is not used: on torch
2.13 it silently leaves built-in modules such as ``nn.Linear`` uncompiled.

CPU inductor compiles C++ kernels with the platform's compiler and Python's headers;
``check_toolchain`` finds both the way inductor will, before any worker starts.
"""
from __future__ import annotations

import sysconfig
import types
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from disttrain.config.errors import ConfigError
from disttrain.config.schema import CompileConfig, section
from disttrain.memory.checkpointing import find_blocks

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FIX = "or set trainer.compile=false"


def enabled(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "trainer.compile", default=False))


def validate(cfg: DictConfig) -> None:
    """Bad ``compile.*`` values, and a platform that cannot compile, fail before any worker starts."""
    if not enabled(cfg):
        return
    opts = section(cfg, "compile")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if opts.backend not in backends:
        raise ConfigError(f"compile.backend={opts.backend!r} is not a torch.compile backend: use one of "
                          f"{', '.join(sorted(backends))}.")
    if opts.mode not in MODES:
        raise ConfigError(f"compile.mode={opts.mode!r} must be null or one of {', '.join(MODES[1:])}.")
    if opts.mode is not None and opts.backend != "inductor":
        raise ConfigError(f"compile.mode={opts.mode} is an inductor option: set compile.backend=inductor "
                          "or compile.mode=null.")
    check_toolchain(opts.backend, _device_type(cfg))


def _device_type(cfg: DictConfig) -> str:
    from disttrain.distributed.process_group import resolve_backend

    return "cuda" if resolve_backend(str(OmegaConf.select(cfg, "dist.backend", default="auto"))) == "nccl" else "cpu"


def check_toolchain(backend: str, device_type: str) -> None:
    """ConfigError when inductor could not build kernels here: no Triton for CUDA; for CPU,
    no runnable C++ compiler (looked up with inductor's own search: ``$CXX`` or g++) or no
    Python headers (each kernel's binding includes Python.h)."""
    if backend != "inductor":
        return  # the other backends generate no code
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("trainer.compile=true on CUDA needs Triton for inductor's kernels: install the "
                              f"triton that matches your torch build, {FIX}.")
        return
    compiler = cpp_compiler()
    if compiler is None:
        raise ConfigError("trainer.compile=true needs a C++ compiler for torch.compile on CPU (inductor found "
                          "none: set CXX or put g++ on PATH): install one (Debian/Ubuntu: apt-get install g++), "
                          f"{FIX}.")
    headers = Path(sysconfig.get_path("include"))
    if not (headers / "Python.h").exists():
        raise ConfigError(f"trainer.compile=true needs Python's C headers for inductor's CPU kernels ({headers} "
                          f"has no Python.h; compiler {compiler}): install them (Debian/Ubuntu: apt-get install "
                          f"python3-dev), {FIX}.")


def cpp_compiler() -> str | None:
    """The C++ compiler CPU inductor would run (its own lookup), or None when there is none."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError):
        return None


def compile_blocks(module: nn.Module, opts: CompileConfig) -> nn.Module:
    """Compile each block of ``module`` (the whole module when it has no list of blocks) in
    place; returns the same object. Blocks of one class share one compiled function, so a
    model of n identical blocks compiles one graph (torch's cache keys on code and shapes,
    not on the module)."""
    try:
        blocks = find_blocks(module)
    except ValueError:
        blocks = [module]
    compiled: dict[Callable, Callable] = {}
    for block in blocks:
        forward = block.forward.__func__  # the class's forward, or activation checkpointing's
        if forward not in compiled:
            compiled[forward] = torch.compile(forward, backend=opts.backend, mode=opts.mode,
                                              fullgraph=opts.fullgraph)
        # bound with MethodType, so copy.deepcopy rebinds it to the copy
        block.forward = types.MethodType(compiled[forward], block)
        block._disttrain_compiled = True
    return module


def compiler(cfg: DictConfig) -> Callable[[nn.Module], nn.Module]:
    """What ``SetupContext.apply_memory`` runs after the memory levers: identity when off."""
    if not enabled(cfg):
        return lambda module: module
    opts = section(cfg, "compile")
    return lambda module: compile_blocks(module, opts)


def compiled_blocks(module: nn.Module) -> list[nn.Module]:
    """The submodules ``compile_blocks`` compiled (tests and logs: compile really happened)."""
    return [m for m in module.modules() if getattr(m, "_disttrain_compiled", False)]

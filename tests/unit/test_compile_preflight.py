"""trainer.compile without processes: the platform check (a C++ compiler and Python's headers
for CPU inductor, found the way inductor finds them, each faked absent), the compile.* choices,
and per-block compile keeping every parameter's name."""
import subprocess
import sys
import sysconfig

import pytest
import torch
from omegaconf import OmegaConf

from disttrain.config.errors import ConfigError
from disttrain.config.schema import CompileConfig
from disttrain.engine import compile as compile_
from disttrain.models.gpt import build_gpt
from helpers import ROOT, cli_env


def _cfg(**compile_opts):
    return OmegaConf.create({"trainer": {"compile": True}, "dist": {"backend": "gloo"}, "compile": compile_opts})


def test_this_machine_can_compile_for_cpu():
    compiler = compile_.cpp_compiler()
    assert compiler and subprocess.run([compiler, "--version"], capture_output=True).returncode == 0
    compile_.validate(_cfg())


def test_no_cxx_compiler_is_one_line_naming_the_key_and_the_fix(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    with inductor_config.patch({"cpp.cxx": (None, "disttrain-no-such-c++")}):
        assert compile_.cpp_compiler() is None
        with pytest.raises(ConfigError) as err:
            compile_.validate(_cfg())
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.compile=true needs a C++ compiler")
    assert "apt-get install g++" in message and "trainer.compile=false" in message
    compile_.validate(_cfg(backend="aot_eager"))  # generates no code: needs no compiler
    compile_.validate(OmegaConf.create({"trainer": {"compile": False}}))  # off: nothing is checked


def test_no_python_headers_is_refused(monkeypatch, tmp_path):
    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path",
                        lambda name, *a, **k: str(tmp_path) if name == "include" else real(name, *a, **k))
    with pytest.raises(ConfigError, match=r"Python's C headers .*python3-dev.*trainer.compile=false"):
        compile_.validate(_cfg())


def test_cuda_without_triton_is_refused(monkeypatch):
    import torch.utils._triton as triton_probe

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match="trainer.compile=true on CUDA needs Triton"):
        compile_.check_toolchain("inductor", "cuda")


@pytest.mark.parametrize("opts,key", [({"backend": "no_such_backend"}, "compile.backend='no_such_backend'"),
                                      ({"mode": "fastest"}, "compile.mode='fastest'"),
                                      ({"backend": "aot_eager", "mode": "max-autotune"}, "compile.mode=max-autotune")])
def test_bad_compile_options_name_the_key(opts, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        compile_.validate(_cfg(**opts))


def test_cli_without_a_compiler_exits_2_before_any_worker_starts(tmp_path):
    """The real check in a fresh process: inductor reads $CXX when it loads."""
    proc = subprocess.run([sys.executable, "-m", "disttrain", "trainer.compile=true", "dist.nproc_per_node=2",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=cli_env({"CXX": "/nonexistent/c++"}),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "disttrain: config error: trainer.compile=true needs a C++ compiler")
    assert "starting 2 local workers" not in proc.stdout + proc.stderr and not (tmp_path / "checkpoints").exists()


def test_compile_blocks_keeps_names_and_compiles_every_block():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_gpt(vocab_size=16, block_size=4, dim=8, heads=2, layers=2)
    names, x = [n for n, _ in model.named_parameters()], torch.randint(0, 16, (2, 4))
    expected = model(x)
    counters.clear()
    compile_.compile_blocks(model, CompileConfig(backend="eager"))
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == names
    assert compile_.compiled_blocks(model) == list(model.children())  # embedding, 2 blocks, head
    assert torch.equal(model(x), expected)
    assert counters["frames"]["ok"] == 3  # one graph per block class: the two Blocks share one

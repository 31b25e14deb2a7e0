"""Slurm host lists (issue 18): disttrain.distributed.hostlist against the forms of Slurm's
documentation and, where scontrol is on PATH, against `scontrol show hostnames` itself."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from disttrain.distributed.hostlist import expand, first_host
from disttrain.distributed.env import LauncherEnvError

EXPANSIONS = [
    ("n1", ["n1"]),
    ("login-2.cluster", ["login-2.cluster"]),
    ("lx[10-12]", ["lx10", "lx11", "lx12"]),  # Slurm's man pages
    ("linux[0-2,128]", ["linux0", "linux1", "linux2", "linux128"]),
    ("tux[2,1-2]", ["tux2", "tux1", "tux2"]),  # written order, duplicates kept
    ("gpu[03-05,7],cpu1", ["gpu03", "gpu04", "gpu05", "gpu7", "cpu1"]),
    ("n[1,3-5,10]", ["n1", "n3", "n4", "n5", "n10"]),
    ("n[001-003]", ["n001", "n002", "n003"]),
    ("n[09-11]", ["n09", "n10", "n11"]),  # width of LO
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[01-3]", ["n01", "n02", "n03"]),
    ("n[1-03]", ["n1", "n2", "n3"]),
    ("node-[010-012]", ["node-010", "node-011", "node-012"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ("[1-2]", ["1", "2"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("a,,b,", ["a", "b"]),
    ("n[1-2] m3", ["n1", "n2", "m3"]),
    ("rack[0-1]_blade[0-2]", ["rack0_blade0", "rack0_blade1", "rack0_blade2",
                              "rack1_blade0", "rack1_blade1", "rack1_blade2"]),
    ("rack[1-2]-node[01-03]", ["rack1-node01", "rack1-node02", "rack1-node03",
                               "rack2-node01", "rack2-node02", "rack2-node03"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
    # Three groups or more: Slurm's order (last fastest, then first, then second), not itertools.product.
    ("a[1-2]b[1-2]c[1-2]", ["a1b1c1", "a1b1c2", "a2b1c1", "a2b1c2", "a1b2c1", "a1b2c2", "a2b2c1", "a2b2c2"]),
    # Text after the last group: Slurm 23.11+ ("shared suffix"); 22.05 says "Invalid hostlist".
    ("n[1-3]-ib", ["n1-ib", "n2-ib", "n3-ib"]),
    ("node[0001-0002]-int,n[1-2]a", ["node0001-int", "node0002-int", "n1a", "n2a"]),
    ("x[1-2]y[3-4]z", ["x1y3z", "x1y4z", "x2y3z", "x2y4z"]),
]

BAD = ["", "  ", ",", "n[1-3", "n1-3]", "n[[1-3]", "a[[1]]", "n[1-3]]", "n[5-3]", "n[a-c]", "n[1x]",
       "n[]", "n[1-]", "n[-3]", "n[1,,2]", "n[1-2-3]", "n1,m[5-3]"]


@pytest.mark.parametrize("nodelist,hosts", EXPANSIONS)
def test_expand(nodelist, hosts):
    assert expand(nodelist) == hosts


@pytest.mark.parametrize("nodelist,hosts", EXPANSIONS)
def test_first_host_is_the_first_of_the_expansion(nodelist, hosts):
    assert first_host(nodelist) == hosts[0]


@pytest.mark.timeout(10)
def test_first_host_does_not_expand_the_list():
    assert first_host("n[1-100000]") == "n1"
    assert first_host("a[00001-99999]b[1-99999]c[1-99999]") == "a00001b1c1"  # 10**15 hosts


@pytest.mark.parametrize("nodelist", BAD)
def test_unparsable_list_names_the_variable_and_the_way_out(nodelist):
    for parse in (expand, first_host):
        with pytest.raises(LauncherEnvError) as caught:
            parse(nodelist)
        message = str(caught.value)
        assert "SLURM_JOB_NODELIST" in message and repr(nodelist) in message and "MASTER_ADDR" in message


# Compared with real scontrol; the ones with text after the last group only on Slurm 23.11+.
SCONTROL_LISTS = ["n1", "gpu[03-05,7],cpu1", "n[1,3-5,10]", "n[001-003]", "n[09-11],n[9-11]", "n[01-3],m[1-03]",
                  "a1,b[2-3],c", "tux[2,1-2],tux[3,1]", "rack[1-2]-node[01-03]", "a[1,3]b[2,1]",
                  "a[1-2]b[1-2]c[1-2]", "a[1-2]-b[3-4]-c[5,7]-d[0-1]", "10.0.0.[1-2],[7-8]",
                  "n007,n[8-9],n[010]", "n[1-2] m3,,x.y[0-1].z[2-3]", "lx[0-2999]"]
SUFFIX_LISTS = ["n[1-3]-ib", "node[0001-0002]-int,n[1-2]a", "x[1-2]y[3-4]z"]


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """`scontrol show hostnames` parses offline, but it needs a slurm.conf to start: a minimal one."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not on PATH (Debian: apt-get install slurm-client)")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=hostlist-test\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    version = subprocess.run(["scontrol", "--version"], env=env, capture_output=True, text=True, timeout=30).stdout
    numbers = re.search(r"(\d+)\.(\d+)", version)
    assert numbers, f"unexpected `scontrol --version`: {version!r}"

    def hostnames(nodelist: str) -> list[str]:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "Invalid hostlist" not in proc.stdout + proc.stderr, proc
        return proc.stdout.split()

    hostnames.version = (int(numbers.group(1)), int(numbers.group(2)))
    return hostnames


@pytest.mark.parametrize("nodelist", SCONTROL_LISTS + SUFFIX_LISTS)
def test_expand_matches_scontrol(scontrol, nodelist):
    if nodelist in SUFFIX_LISTS and scontrol.version < (23, 11):
        pytest.skip("scontrol %d.%d predates text after the last bracket (Slurm 23.11)" % scontrol.version)
    assert expand(nodelist) == scontrol(nodelist)

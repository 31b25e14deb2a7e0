"""Slurm host lists (``$SLURM_JOB_NODELIST``) read the way ``scontrol show hostnames`` reads them.

Hand-written: there is no well-kept pure-Python hostlist library we want as a dependency, and
compute nodes inside containers often lack the Slurm client tools to ask ``scontrol``.

The grammar, checked against Slurm's own parser (src/common/hostlist.c) and real ``scontrol``:

* names are separated by commas or whitespace outside brackets; empty names are skipped;
* a name is text with any number of ``[...]`` groups, text between and after them
  (``rack[1-2]-node[01-03]``, ``n[1-3]-ib``: the text after the last group is Slurm 23.11+);
* a group is a comma list of ``N`` or ``LO-HI`` (LO <= HI, digits only), in the order written,
  duplicates kept; numbers are zero padded to the width of LO (``n[001-003]``, ``n[09-11]``);
* several groups expand in Slurm's order, not the plain cartesian one: the last group varies
  fastest, then the first, second, ... up to the one before the last (``a[1-2]b[1-2]c[1-2]`` ->
  a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ...). With two groups both orders agree.

Stricter than scontrol, which prints a mangled name or "Invalid hostlist" and exits 0: an
unbalanced bracket, an empty list, a bad range (``[5-3]``, ``[a-c]``, ``[1-]``, ``[]``) raise
``LauncherEnvError``. Unlike Slurm, no cap of 65536 hosts a range: ``first_host`` never expands.
"""
from __future__ import annotations

import re
from typing import Iterator

from disttrain.distributed.errors import LauncherEnvError

_SEPARATORS = re.compile(r"[,\s]+")
_NAME = re.compile(r"(?:[^\[\],\s]|\[[^\[\]]*\])+")  # text and whole bracket groups
_GROUP = re.compile(r"\[([^\]]*)\]")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")

Range = tuple[int, int, int]  # lo, hi, zero-padded width
Name = tuple[list[str], list[list[Range]]]  # texts around the groups (one more), groups


def expand(nodelist: str) -> list[str]:
    """Every host of ``nodelist``, in the order ``scontrol show hostnames`` prints them."""
    return [host for texts, groups in _parse(nodelist) for host in _hosts(texts, groups)]


def first_host(nodelist: str) -> str:
    """The first host of ``nodelist`` (the job's master); checks the whole list, expands nothing."""
    texts, groups = _parse(nodelist)[0]
    return next(_hosts(texts, groups))


def _error(nodelist: str, why: str) -> LauncherEnvError:
    return LauncherEnvError(
        f"cannot parse $SLURM_JOB_NODELIST={nodelist!r}: {why}. Export MASTER_ADDR "
        "(the first node's address) to start without reading the node list."
    )


def _parse(nodelist: str) -> list[Name]:
    """Split into names outside brackets and parse each one; raise on anything left over."""
    names, pos = [], 0
    while pos < len(nodelist):
        if sep := _SEPARATORS.match(nodelist, pos):
            pos = sep.end()
        elif name := _NAME.match(nodelist, pos):
            names.append(_parse_name(nodelist, name.group()))
            pos = name.end()
        else:
            raise _error(nodelist, f"unbalanced bracket at {nodelist[pos:]!r}")
    if not names:
        raise _error(nodelist, "it names no host")
    return names


def _parse_name(nodelist: str, name: str) -> Name:
    parts = _GROUP.split(name)  # texts at even indices, group bodies at odd ones
    return parts[0::2], [_parse_group(nodelist, body) for body in parts[1::2]]


def _parse_group(nodelist: str, body: str) -> list[Range]:
    ranges = []
    for item in body.split(","):
        match = _RANGE.fullmatch(item)
        if not match:
            raise _error(nodelist, f"[{body}] holds {item!r}, not a number or a LO-HI range")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(lo) > int(hi):
            raise _error(nodelist, f"range {item!r} runs backwards")
        ranges.append((int(lo), int(hi), len(lo)))
    return ranges


def _hosts(texts: list[str], groups: list[list[Range]]) -> Iterator[str]:
    """Lazily, in Slurm's order: it fixes the group before the last one value at a time (outer
    loop) and recurses on the rest, so the last group varies fastest, then the first, ..."""
    if not groups:
        yield texts[0]
    elif len(groups) == 1:
        for number in _numbers(groups[0]):
            yield texts[0] + number + texts[1]
    else:
        for number in _numbers(groups[-2]):
            merged = [*texts[:-3], texts[-3] + number + texts[-2], texts[-1]]
            yield from _hosts(merged, [*groups[:-2], groups[-1]])


def _numbers(group: list[Range]) -> Iterator[str]:
    for lo, hi, width in group:
        for number in range(lo, hi + 1):
            yield f"{number:0{width}d}"

"""Processes read from /proc (Linux), for the tests that kill a parent and look for its leftovers."""
from __future__ import annotations

from pathlib import Path

HAS_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields after the command name


def running(pid: int) -> bool:
    """Whether `pid` exists and has not ended (a zombie has ended; only its parent has not reaped it)."""
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> set[int]:
    kids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int(_stat(int(p.name))[1]) == pid:
                    kids.add(int(p.name))
            except OSError:
                continue
    return kids

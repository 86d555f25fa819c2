"""Long real texts the benchmark machines ship with, by name: licenses
(legal prose), Python's own sources (code) and its documentation (technical
prose), so that accuracy is judged over several genres, not one document."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEXTS", "read", "write_to"]

_LICENSES = Path("/usr/share/common-licenses")
_STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _file(path: Path) -> Callable[[], str]:
    return lambda: path.read_text(encoding="utf-8", errors="replace")


def _pydoc_topics() -> str:
    """Python's language and library reference topics (what ``help()`` prints), joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


TEXTS: dict[str, Callable[[], str]] = {
    "gpl3": _file(_LICENSES / "GPL-3"),
    "lgpl21": _file(_LICENSES / "LGPL-2.1"),
    "mpl11": _file(_LICENSES / "MPL-1.1"),
    "argparse": _file(_STDLIB / "argparse.py"),
    "subprocess": _file(_STDLIB / "subprocess.py"),
    "pydoc": _pydoc_topics,
}


def read(name: str) -> str:
    """The text called ``name`` (a key of ``TEXTS``)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; expected one of {sorted(TEXTS)}")
    return TEXTS[name]()


def write_to(name: str, folder: Path) -> Path:
    """The text as a file in ``folder`` (for tools that take a path)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.txt"
    path.write_text(read(name), encoding="utf-8")
    return path

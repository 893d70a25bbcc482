"""How the committed document writes a path: relative to the working directory, under a
placeholder for the run and data directories, never absolute."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_ABSOLUTE = re.compile(r"(?<![\w.~/-])/[^\s'\"`,;)]+")


@dataclass(frozen=True)
class PathStyle:
    """How the document writes a path: relative to the working directory when under it,
    else with its leading directory replaced by a placeholder (`RUNS/` for the directory
    holding the run directories, `DATA/` for the one holding the data splits), else as
    `.../<name>`. Never absolute."""

    #: (root, placeholder), most specific root first.
    roots: tuple[tuple[Path, str], ...] = ()
    #: The working directory paths are made relative to.
    cwd: Path = field(default_factory=Path.cwd)

    @classmethod
    def of(cls, runs: Path, data_dir: str | Path | None = None, cwd: Path | None = None) -> PathStyle:
        roots = [(absolute(runs).parent, "RUNS")]
        if data_dir:
            roots.append((absolute(data_dir), "DATA"))
        roots.sort(key=lambda r: -len(r[0].parts))
        return cls(tuple(roots), absolute(cwd or Path.cwd()))

    def path(self, p: str | Path) -> str:
        """`p` as the document writes it."""
        if not Path(p).is_absolute():
            return str(p)
        p = absolute(p)
        if p.is_relative_to(self.cwd):
            return str(p.relative_to(self.cwd)) if p != self.cwd else "."
        for root, name in self.roots:
            if p.is_relative_to(root):
                return str(Path(name) / p.relative_to(root))
        return f".../{p.name}"

    def text(self, s: str) -> str:
        """`s` (a recorded command line, a config value) with every absolute path in it rewritten."""
        return _ABSOLUTE.sub(lambda m: self.path(m.group(0)), s)


def absolute(p: str | Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser()))

"""The one place the DermEdge version lives (pyproject.toml reads it from here), and what a clinic records for
traceability: the version plus every shipped model with its ONNX sha256."""
from __future__ import annotations

import argparse

from engines.fsutil import sha256_file

__version__ = "0.2.0"


def version_text(prog: str) -> str:
    from engines.select import _index, shipped_models

    default = _index().get("default")
    lines = [f"{prog} (DermEdge) {__version__}"]
    for name, path in shipped_models().items():
        tag = " (default)" if name == default else ""
        digest = sha256_file(path) if path.is_file() else "missing"
        lines.append(f"model {name}{tag}: {path.name} sha256 {digest}")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """`--version`: the version and the shipped models' sha256 (computed only when asked for)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text(parser.prog))
        parser.exit()

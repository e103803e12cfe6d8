"""TensorRT's Python API names, read out of NVIDIA's binding wheels without importing them, and a check of the
names DermEdge's TensorRT backend uses against them. No TensorRT runs on a machine without NVIDIA's libraries,
but the wheels download anywhere, and their names tell what each version has.

    python packaging/tensorrt/api_names.py write [--wheels DIR]   # download the wheels, (re)write api/*.txt
    python packaging/tensorrt/api_names.py check [FILE.py ...]    # names FILE uses that a version lacks

A pybind11 module keeps every attribute, method and enum value name as a NUL-terminated string in its binary.
The linker merges strings that end alike, so `set_output_type` may be stored only as the tail of
`reset_output_type`: a list of whole strings would miss it. Each list therefore holds the identifier at the end
of every NUL-terminated string, and a name counts as present when it ends one of them. That can say "present"
for a name that is only the tail of another (never the reverse): a name reported missing is missing.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTS = HERE / "api"
BACKEND = HERE.parents[1] / "engines" / "tensorrt_backend.py"
# Jetson (JetPack 6), desktop CUDA 12 (newest 10.x), desktop CUDA 13 (11.x).
WHEELS = ("tensorrt-cu12-bindings==10.3.0", "tensorrt-cu12-bindings==10.16.1.11", "tensorrt-cu13-bindings==11.4.0.106")
# Variables that hold TensorRT objects in the backend: attributes read from them are TensorRT API.
TRT_OBJECTS = frozenset({"trt", "builder", "network", "parser", "config", "profile", "inp", "cache", "runtime",
                         "engine", "context", "logger", "layer"})
TAIL = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")
MANGLED = re.compile(r"^_Z|NS_|EEE|_FUN")  # C++ symbol remnants, not Python names
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def wheel_names(wheel: Path) -> set[str]:
    """Identifier tails of the binary's NUL-terminated strings, plus the identifiers of the wheel's Python files
    (`nptype`, `__version__` are defined in Python)."""
    names: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.endswith(".so") or ".so." in info.filename:
                for chunk in z.read(info).split(b"\0"):
                    m = TAIL.search(chunk[-80:])
                    if m and not MANGLED.search(m.group().decode()):
                        names.add(m.group().decode())
            elif info.filename.endswith(".py"):
                names.update(IDENT.findall(z.read(info).decode("utf-8", "replace")))
    return names


def version_of(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def write_lists(wheel_dir: Path | None) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        where = wheel_dir or Path(tmp)
        if wheel_dir is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, *WHEELS],
                           check=True)
        LISTS.mkdir(exist_ok=True)
        written = []
        for wheel in sorted(where.glob("tensorrt_cu1*_bindings-*.whl")):
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            out = LISTS / f"tensorrt-{version_of(wheel)}.txt"
            body = sorted(wheel_names(wheel))
            out.write_text(f"# identifier tails of the strings in {wheel.name} (sha256 {digest})\n" + "\n".join(body) + "\n")
            written.append(out)
        return written


def read_list(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def has(names: list[str], name: str) -> bool:
    return any(n.endswith(name) for n in names)


def _chain(node: ast.AST) -> list[str]:
    """`a.b().c.d` -> ['a', 'b', 'c', 'd']."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            if isinstance(node, ast.Name):
                parts.append(node.id)
            return parts[::-1]


def trt_names_used(source: str) -> set[str]:
    """Every attribute read from `trt` or from a variable holding a TensorRT object (self.engine included)."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            chain = _chain(node)
            for i, part in enumerate(chain[:-1]):
                if part in TRT_OBJECTS:
                    used.update(p for p in chain[i + 1:] if not p.startswith("__"))
                    break
    return used


def missing(source: str, names: list[str]) -> list[str]:
    return sorted(n for n in trt_names_used(source) if not has(names, n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="download the binding wheels and write api/tensorrt-VERSION.txt")
    w.add_argument("--wheels", type=Path, help="a folder that already holds the wheels")
    c = sub.add_parser("check", help="names a Python file uses that a TensorRT version lacks")
    c.add_argument("files", nargs="*", type=Path, default=[BACKEND])
    a = ap.parse_args(argv)
    if a.cmd == "write":
        for p in write_lists(a.wheels):
            print(f"{p}: {len(read_list(p))} names")
        return 0
    bad = 0
    for lst in sorted(LISTS.glob("tensorrt-*.txt")):
        names = read_list(lst)
        for f in a.files:
            gone = missing(f.read_text(), names)
            bad += len(gone)
            print(f"{f} on {lst.stem}: " + (f"MISSING {', '.join(gone)}" if gone else "all names present"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Test-only cffi build of the userspace TCP (`_tcp.c` alone, declared by `_tcp.h`).

The module is compiled once into a temporary cache directory keyed by the hash of the sources
and flags, then imported from there; the main engine build is not involved.
`UNCLAW_SANITIZE=1` adds AddressSanitizer and UBSan (run pytest with the ASan runtime preloaded:
`LD_PRELOAD=$(gcc -print-file-name=libasan.so)`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from cffi import FFI

ENGINE_DIR = Path(__file__).resolve().parents[2] / "unclaw_tui" / "engine"
HEADER = ENGINE_DIR / "_tcp.h"
SOURCE = ENGINE_DIR / "_tcp.c"
MODULE_NAME = "_tcp_test_cffi"


def cdef_from_header(text: str) -> str:
    """The header minus what cffi's parser does not take: the include guard and #includes."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("#ifndef", "#endif", "#include")):
            continue
        if stripped.startswith("#define") and len(stripped.split()) == 2:
            continue
        kept.append(line)
    return "\n".join(kept)


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"]
    link_args: list[str] = []
    if os.environ.get("UNCLAW_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        compile_args += sanitize
        link_args += sanitize
    return compile_args, link_args


def build_dir() -> Path:
    compile_args, link_args = _flags()
    digest = hashlib.sha256()
    for part in (HEADER.read_bytes(), SOURCE.read_bytes(), " ".join(compile_args + link_args)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    return Path(tempfile.gettempdir()) / "unclaw-tcp-build" / digest.hexdigest()[:16]


def load() -> ModuleType:
    """Build (if this source version was never built) and import the test module."""
    out = build_dir()
    existing = sorted(out.glob(f"{MODULE_NAME}*.so")) if out.exists() else []
    if not existing:
        compile_args, link_args = _flags()
        ffibuilder = FFI()
        ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
        ffibuilder.set_source(
            MODULE_NAME,
            '#include "_tcp.h"',
            sources=[str(SOURCE)],
            include_dirs=[str(ENGINE_DIR)],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
        out.mkdir(parents=True, exist_ok=True)
        built = Path(ffibuilder.compile(tmpdir=str(out), verbose=False))
        existing = [built]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, existing[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(load().__file__)

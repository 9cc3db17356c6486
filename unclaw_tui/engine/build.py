"""cffi builder for the C engine (SOURCES_REL), declared by HEADERS; `_wire.h` and `_engine.h`
are private to the C files.

Used by setup.py (`cffi_modules`) and, for development, in place:
`python -m unclaw_tui.engine.build` puts `_wgstack_cffi*.so` beside this file.
`UNCLAW_SANITIZE=1` builds with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

ENGINE_DIR = Path(__file__).resolve().parent
REPO_ROOT = ENGINE_DIR.parent.parent
# The cdef takes the headers in dependency order: _splice.h uses _tcp.h's types, _wgstack.h
# (which includes both) the two, _worker.h (the data plane's own thread) the engine.
HEADERS = (
    ENGINE_DIR / "_tcp.h",
    ENGINE_DIR / "_splice.h",
    ENGINE_DIR / "_wgstack.h",
    ENGINE_DIR / "_worker.h",
    ENGINE_DIR / "_dns.h",
)
# Relative to the repo root, the working directory of setuptools builds (and of __main__ below):
# setuptools rejects absolute source paths, and distutils would mirror them under its tmpdir.
ENGINE_DIR_REL = "unclaw_tui/engine"
SOURCES_REL = [
    f"{ENGINE_DIR_REL}/_wg.c",  # the WireGuard data plane
    f"{ENGINE_DIR_REL}/_hub.c",  # the engine hub
    f"{ENGINE_DIR_REL}/_wire.c",  # wire formats
    f"{ENGINE_DIR_REL}/_tcp.c",  # the userspace TCP
    f"{ENGINE_DIR_REL}/_splice.c",  # the relay's splices
    f"{ENGINE_DIR_REL}/_worker.c",  # the engine's thread
    f"{ENGINE_DIR_REL}/_dns.c",  # the DNS query shape check
]


def cdef_from_header(text: str) -> str:
    """The header minus what cffi's parser does not take: the include guard, #includes, and the
    C-only declarations between `#ifndef UNCLAW_CDEF` and its `#endif`."""
    kept = []
    c_only = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "#ifndef UNCLAW_CDEF":
            c_only = True
            continue
        if c_only or stripped.startswith(("#ifndef", "#endif", "#include")):
            c_only = c_only and not stripped.startswith("#endif")
            continue
        if stripped.startswith("#define") and len(stripped.split()) == 2:
            continue  # the include guard's bare #define
        kept.append(line)
    return "\n".join(kept)


# Hidden visibility: the module exports only PyInit; the engine's C functions are reached
# through it, so they need no dynamic symbols (smaller, and calls between files stay direct).
compile_args = ["-O2", "-std=c11", "-Wall", "-Wextra", "-pthread", "-fvisibility=hidden"]
link_args: list[str] = ["-pthread"]
if os.environ.get("UNCLAW_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args += sanitize
    link_args += sanitize

ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdef_from_header(header.read_text()) for header in HEADERS))
ffibuilder.set_source(
    "unclaw_tui.engine._wgstack_cffi",
    '#include "_wgstack.h"\n#include "_worker.h"\n#include "_dns.h"',
    sources=SOURCES_REL,
    include_dirs=[ENGINE_DIR_REL],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)

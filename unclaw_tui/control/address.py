"""Where the control socket lives, and how to name it to bind() and connect().

A Unix socket's address holds at most 107 bytes of path, and a state dir can be deeper than
that (a test's tmp dir, a long home).  Such a path is reached through the directory's
descriptor instead: /proc/self/fd/N/control.sock is short and names the same file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

SOCKET_NAME = "control.sock"
_MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one for the NUL


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir).expanduser() / SOCKET_NAME


@contextlib.contextmanager
def sockaddr(path: Path) -> Iterator[str]:
    """An address for bind()/connect() naming path, valid inside the with block.  OSError if
    the directory cannot be opened (ENOENT when it does not exist)."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket, as the kernel
    recorded it at connect() (SO_PEERCRED: it cannot be forged by the peer)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether a server listens on the socket at path.  Refused or missing: no (a dead
    process's leftover).  Accepted, or no answer in time (a full backlog of a busy but live
    server): yes."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(timeout)
    try:
        with sockaddr(path) as address:
            probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, BlockingIOError):  # EAGAIN: the backlog is full
        return True
    finally:
        probe.close()
    return True

"""The control server: a Unix socket in the state dir through which the CLI (and, later,
consoles in other processes) reach a running gateway's memory.

Asyncio IO around `protocol.ServerSession`; it runs on the gateway's event loop, so handlers
may use the gateway directly.  Who may connect: the socket is mode 0600 (from its creation)
in a state dir nobody else may write, and each connection's peer credentials (SO_PEERCRED)
must be the gateway's own uid or root.
Bounded: connections (max_connections), idle time (idle_timeout without a request, or a
client that does not read its answers), message size and requests in flight (protocol.py).

    server = ControlServer(state_dir, server_version="0.1.0")
    server.register("status", lambda params: {...})          # sync or async, params validated
    await server.start()        # ControlSocketError: another gateway runs on this dir, ...
    ...
    await server.stop()         # closes the connections and removes the socket
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unclaw_tui.control.address import answers, peer_uid, sockaddr, socket_path
from unclaw_tui.control.protocol import (
    MAX_IN_FLIGHT,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Close,
    Command,
    ControlError,
    Dispatch,
    ErrorCode,
    Param,
    ParamSpec,
    Request,
    Send,
    ServerSession,
    error_line,
    is_method_name,
)
from unclaw_tui.state import StateDir, StateError, locked

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
BACKLOG = 16

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


class ControlSocketError(StateError):
    """The control socket cannot be set up; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 16
    idle_timeout: float = 60.0  # seconds without a request (or without reading our answers)
    max_message: int = MAX_MESSAGE
    max_in_flight: int = MAX_IN_FLIGHT


class ControlServer:
    def __init__(self, state_dir: Path, server_version: str, limits: Limits | None = None) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.path = socket_path(self.state_dir)
        self.server_version = server_version
        self.limits = limits or Limits()
        self._handlers: dict[str, Handler] = {}
        self._specs: dict[str, ParamSpec] = {}
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.refused = 0  # connections from another user, for tests and logs
        self.register("ping", lambda params: "pong")
        self.register("version", self._version)

    def _version(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "server": self.server_version}

    def register(
        self, method: str, handler: Handler, params: dict[str, Param] | None = None
    ) -> None:
        """Answer `method` with handler(validated params): its return value (awaited if it is
        awaitable) is the result; a ControlError it raises is the error, a ValueError is
        INVALID and a KeyError NOT_FOUND with their one-line message; anything else is
        INTERNAL (logged with its traceback).  params maps each parameter's name to its Param;
        None: the method takes none."""
        if not is_method_name(method):
            raise ValueError(f"invalid method name {method!r}: a-z, 0-9, '_', '.'")
        self._handlers[method] = handler
        self._specs[method] = dict(params or {})

    @property
    def connections(self) -> int:
        return len(self._connections)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind control.sock (mode 0600) and serve.  ControlSocketError (one line) if the state
        dir is not private, another gateway answers on the socket, or it cannot be made."""
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._accepted, sock=sock, limit=self.limits.max_message + 1
            )
        except BaseException:
            sock.close()
            self._unlink_ours()
            raise

    async def stop(self) -> None:
        """Stop listening, close every connection, remove the socket (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        # Closing each transport ends its connection's read with EOF, so every connection task
        # finishes on its own (cancelling them would make asyncio's streams log an error).
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self._unlink_ours()

    def _bind(self) -> socket.socket:
        # Exists, ours, not group/world-writable (so nobody else can replace the socket);
        # the socket itself is 0600 from its creation and checks who connects.
        StateDir(self.state_dir, create=False)
        # Under the dir's lock, so two gateways starting at once cannot both find the old
        # socket stale and both bind: the second sees the first's live socket.
        try:
            with locked(self.state_dir):
                self._remove_stale()
                return self._bind_private()
        except OSError as exc:
            raise ControlSocketError(f"cannot make {self.path}: {exc.strerror}") from None

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; remove it")
        if answers(self.path):
            raise ControlSocketError(
                f"another gateway is running on {self.state_dir} (its control socket "
                f"{self.path} answers); stop it first or use another --state-dir"
            )
        os.unlink(self.path)  # a dead gateway's leftover
        log.info("removed a stale control socket %s", self.path)

    def _bind_private(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # bind() creates the file with 0777 & ~umask: a umask that leaves only 0600 means
            # there is no moment when others may connect.  The umask is the process's, so a
            # file another thread creates meanwhile gets at most 0600 too, which is harmless.
            old_umask = os.umask(0o177)
            try:
                with sockaddr(self.path) as address:
                    sock.bind(address)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            st = os.lstat(self.path)
            if (
                not stat.S_ISSOCK(st.st_mode)
                or stat.S_IMODE(st.st_mode) != 0o600
                or st.st_uid != os.geteuid()
            ):
                os.unlink(self.path)
                raise ControlSocketError(
                    f"{self.path} did not come out as a socket of mode 0600 owned by uid "
                    f"{os.geteuid()}; not serving on it"
                )
            self._bound = (st.st_dev, st.st_ino)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unlink_ours(self) -> None:
        """Remove the socket if it is the one we bound (never a newer gateway's)."""
        if self._bound is None:
            return
        with contextlib.suppress(OSError), locked(self.state_dir):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        self._bound = None

    # -- connections -----------------------------------------------------------------------

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            refusal = self._refusal(writer)
            if refusal is not None:
                code, message = refusal
                with contextlib.suppress(OSError):
                    writer.write(error_line(None, code, message))
                return
            self._connections[task] = writer
            await _Connection(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _refusal(self, writer: asyncio.StreamWriter) -> tuple[ErrorCode, str] | None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock)
        if uid not in (os.geteuid(), 0):
            self.refused += 1
            log.warning("refused a control connection from uid %d", uid)
            return ErrorCode.FORBIDDEN, f"uid {uid} may not control this gateway"
        if len(self._connections) >= self.limits.max_connections:
            return ErrorCode.BUSY, (
                f"{self.limits.max_connections} control connections are open already"
            )
        return None


class _Connection:
    """One accepted connection: reads bytes into its session and carries out the commands."""

    def __init__(
        self, server: ControlServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.session = ServerSession(
            server.server_version,
            methods=server._specs,
            max_message=server.limits.max_message,
            max_in_flight=server.limits.max_in_flight,
        )
        self._write_lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        idle = self.server.limits.idle_timeout
        try:
            if not await self._execute(self.session.start()):
                return
            while not self.session.closed:
                try:
                    async with asyncio.timeout(idle):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    if self.session.in_flight:
                        continue  # a handler is still working: the client waits for it
                    message = f"no request for {idle:g} s; closing"
                    await self._execute(self.session.close(ErrorCode.IDLE, message))
                    return
                if not data:
                    return  # the client closed its side
                if not await self._execute(self.session.receive(data)):
                    return
        finally:
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _execute(self, commands: list[Command]) -> bool:
        """Carry out commands; False once the connection is to close."""
        for command in commands:
            if isinstance(command, Send):
                if not await self._send(command.data):
                    return False
            elif isinstance(command, Dispatch):
                if not await self._dispatch(command.request):
                    return False
            elif isinstance(command, Close):
                return False
        return True

    async def _send(self, data: bytes) -> bool:
        async with self._write_lock:
            self.writer.write(data)
            try:
                # A client that does not read its answers holds them in our buffer: bounded
                # by the idle time, then it is dropped.
                async with asyncio.timeout(self.server.limits.idle_timeout):
                    await self.writer.drain()
            except TimeoutError:
                log.warning("a control client did not read its answers; closing it")
                self.writer.transport.abort()
                return False
        return True

    async def _dispatch(self, request: Request) -> bool:
        handler = self.server._handlers[request.method]
        try:
            result = handler(request.params)
        except Exception as exc:
            return await self._execute(self._failure(request, exc))
        if not inspect.isawaitable(result):
            return await self._execute(self.session.respond(request.id, result))
        # Awaited apart, so a slow handler does not hold up this connection's next requests.
        task = asyncio.create_task(self._finish(request, result))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return True

    async def _finish(self, request: Request, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception as exc:
            commands = self._failure(request, exc)
        else:
            commands = self.session.respond(request.id, result)
        try:
            if not await self._execute(commands):
                self.writer.transport.abort()
        except ConnectionError:
            pass  # the client left before its answer; its reader task sees the EOF

    def _failure(self, request: Request, exc: Exception) -> list[Command]:
        if isinstance(exc, ControlError):
            return self.session.fail(request.id, exc.code, exc.message)
        if isinstance(exc, ValueError):
            return self.session.fail(request.id, ErrorCode.INVALID, _one_line(exc))
        if isinstance(exc, KeyError):
            reason = str(exc.args[0]) if exc.args else "not found"
            return self.session.fail(request.id, ErrorCode.NOT_FOUND, _one_line(reason))
        log.exception("control method %r failed", request.method, exc_info=exc)
        return self.session.fail(
            request.id, ErrorCode.INTERNAL, f"{request.method} failed: {type(exc).__name__}"
        )


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())

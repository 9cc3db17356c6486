"""A blocking control client, for the CLI: one connection, one request at a time.

    with ControlClient.connect(state_dir) as gateway:
        status = gateway.call("status")

Errors are one line for the user: GatewayNotRunning (nothing listens on the state dir's
socket), ClientError (the socket is not trustworthy, the gateway does not answer in time or
says something that is not the protocol), protocol.ControlError (the gateway's error answer).
"""

from __future__ import annotations

import os
import socket
import stat
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from unclaw_tui.control.address import sockaddr, socket_path
from unclaw_tui.control.protocol import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    ControlError,
    ErrorResponse,
    EventMessage,
    Hello,
    LineDecoder,
    ProtocolError,
    Request,
    Response,
    ServerMessage,
    parse_json_line,
    parse_server_message,
    request_line,
)

CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0


class ClientError(Exception):
    """The control connection failed; the message is one line for the user."""


class GatewayNotRunning(ClientError):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(
            f"no gateway is running on {state_dir} "
            "(start it with `unclaw-tui` or `unclaw-tui --no-ui`)"
        )
        self.state_dir = state_dir


class ControlClient:
    def __init__(self, sock: socket.socket, state_dir: Path, hello: Hello) -> None:
        self._sock = sock
        self.state_dir = state_dir
        self.hello = hello
        self._decoder = LineDecoder(MAX_MESSAGE)
        self._lines: deque[bytes] = deque()
        self._next_id = 1
        self.events: list[dict[str, Any]] = []  # pushed while waiting for an answer

    @classmethod
    def connect(cls, state_dir: Path, timeout: float = CONNECT_TIMEOUT) -> ControlClient:
        state_dir = Path(state_dir).expanduser()
        path = socket_path(state_dir)
        _check_socket(path, state_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            with sockaddr(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()  # removed meanwhile, or a dead gateway's leftover
            raise GatewayNotRunning(state_dir) from None
        except (TimeoutError, BlockingIOError):
            sock.close()
            raise ClientError(f"the gateway on {state_dir} does not answer ({path})") from None
        except OSError as exc:
            sock.close()
            raise ClientError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        client = cls(sock, state_dir, Hello(0, ""))
        try:
            client.hello = client._hello(timeout)
        except BaseException:
            client.close()
            raise
        return client

    def _hello(self, timeout: float) -> Hello:
        message = self._read(timeout)
        if isinstance(message, ErrorResponse):  # refused: another uid, or too many clients
            raise ControlError(message.code, message.message)
        if not isinstance(message, Hello):
            raise ClientError(f"{socket_path(self.state_dir)} is not a gateway's control socket")
        if message.protocol != PROTOCOL_VERSION:
            raise ClientError(
                f"the gateway on {self.state_dir} ({message.server}) speaks control protocol "
                f"{message.protocol}, this client {PROTOCOL_VERSION}: use the same version"
            )
        return message

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """The result of method(params); ControlError if the gateway answers with an error."""
        request = Request(self._next_id, method, params or {})
        self._next_id += 1
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(request_line(request))
        except TimeoutError:
            raise ClientError(f"the gateway on {self.state_dir} does not read") from None
        except OSError as exc:
            raise ClientError(f"the gateway closed the connection ({exc.strerror})") from None
        while True:
            message = self._read(timeout)
            if isinstance(message, EventMessage):
                self.events.append(message.event)
            elif isinstance(message, ErrorResponse) and message.id in (request.id, None):
                raise ControlError(message.code, message.message)
            elif isinstance(message, Response) and message.id == request.id:
                return message.result

    def _read(self, timeout: float) -> ServerMessage:
        """The next message; lines already received are used before reading more."""
        while True:
            while not self._lines:
                self._lines.extend(self._decoder.feed(self._receive(timeout)))
            line = self._lines.popleft()
            if line.strip():
                number = self._decoder.lines_seen - len(self._lines)
                try:
                    return parse_server_message(parse_json_line(line, number), number)
                except ProtocolError as exc:
                    raise ClientError(f"the gateway's answer is garbled: {exc.message}") from None

    def _receive(self, timeout: float) -> bytes:
        if self._decoder.overflow is not None:
            raise ClientError(f"the gateway sent too large a message: {self._decoder.overflow}")
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(MAX_MESSAGE)
        except TimeoutError:
            raise ClientError(
                f"the gateway on {self.state_dir} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ClientError(f"the gateway closed the connection ({exc.strerror})") from None
        if not data:
            raise ClientError(f"the gateway on {self.state_dir} closed the connection")
        return data

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_socket(path: Path, state_dir: Path) -> None:
    """GatewayNotRunning if there is no socket; ClientError if it is not one we may trust
    (a socket of another user could be anyone's, answering anything)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise GatewayNotRunning(state_dir) from None
    except OSError as exc:
        raise ClientError(f"cannot access {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ClientError(f"{path} is not a socket")
    if st.st_uid not in (os.geteuid(), 0):
        raise ClientError(f"{path} belongs to uid {st.st_uid}, not to you; not using it")

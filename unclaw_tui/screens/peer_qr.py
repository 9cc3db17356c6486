"""A peer's client config as a QR code to scan with a phone, and as text.

When the terminal is too small for the code, the screen says which size it needs, still shows
the text, and `s` saves the code as a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container, Horizontal, VerticalScroll
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import Footer, Label, Static

from unclaw_tui import qr
from unclaw_tui.widgets.qr_code import QrCode

# Beside the code, the config text wants this many columns; else it goes under the code.
TEXT_COLUMNS = 40
CHROME_ROWS = 2  # title + footer


class PeerQrScreen(Screen[None]):
    CSS_PATH = "peer_qr.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "close", "Back"),
        Binding("s", "save_png", "Save PNG"),
    ]

    def __init__(self, peer_name: str, config_text: str, png_dir: Path | None = None) -> None:
        super().__init__()
        self.peer_name = peer_name
        self.config_text = config_text
        self.png_dir = png_dir
        self.saved_to: Path | None = None

    def compose(self) -> ComposeResult:
        yield Label(
            f"Peer {self.peer_name}: scan with the WireGuard app, or import the text",
            id="qr-title",
        )
        with Horizontal(id="qr-body"):
            with Container(id="qr-box"):
                yield QrCode(self.config_text, id="qr")
            with VerticalScroll(id="config-box"):
                yield Static("", id="too-small")
                yield Static(self.config_text, id="config", markup=False)
        yield Footer()

    @property
    def needed_size(self) -> tuple[int, int]:
        """The smallest terminal (columns, rows) that shows the whole code."""
        columns, rows = self.query_one(QrCode).cells_needed
        return columns + 2, rows + CHROME_ROWS

    def on_mount(self) -> None:
        self._layout(self.app.size.width, self.app.size.height)

    def on_resize(self, event: Resize) -> None:
        self._layout(event.size.width, event.size.height)

    def _layout(self, width: int, height: int) -> None:
        need_w, need_h = self.needed_size
        too_small = width < need_w or height < need_h
        self.set_class(too_small, "-too-small")
        self.set_class(not too_small and width < need_w + TEXT_COLUMNS, "-stacked")
        self.query_one("#too-small", Static).update(
            f"The QR code needs a terminal of at least {need_w}x{need_h} "
            f"(this one is {width}x{height}). Enlarge the window, or press s to save "
            "the code as a PNG.\n"
            if too_small
            else ""
        )

    def png_path(self) -> Path:
        """Where `s` writes the PNG: the state dir if it is writable, else the cwd."""
        name = f"{self.peer_name}-wireguard-qr.png"
        if self.png_dir is not None and os.access(self.png_dir, os.W_OK):
            return self.png_dir / name
        return Path.cwd() / name

    def action_save_png(self) -> None:
        path = self.png_path()
        try:
            qr.save_png(self.config_text, path)
        except OSError as exc:
            self.notify(f"Could not save the PNG: {exc}", severity="error")
            return
        self.saved_to = path
        self.notify(f"Saved the QR code to {path}", timeout=8)

    def action_close(self) -> None:
        self.dismiss(None)

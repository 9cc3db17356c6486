"""A QR code drawn with half blocks, its colours pinned black on white.

Every cell, the quiet zone included, carries an explicit RGB foreground and background, so a
light theme or a terminal palette cannot invert the code or drop the light border phones need.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from unclaw_tui.qr import qr_matrix

DARK = "#000000"
LIGHT = "#ffffff"
PINNED = Style(color=DARK, bgcolor=LIGHT, bold=False, dim=False, reverse=False)
# (top dark, bottom dark) -> glyph drawn in the dark colour over the light background
GLYPHS = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}


def half_block_text(matrix: list[list[bool]]) -> Text:
    width = len(matrix[0]) if matrix else 0
    light = [False] * width
    lines: list[str] = []
    for top_index in range(0, len(matrix), 2):
        top = matrix[top_index]
        bottom = matrix[top_index + 1] if top_index + 1 < len(matrix) else light
        lines.append("".join(GLYPHS[pair] for pair in zip(top, bottom, strict=True)))
    return Text("\n".join(lines), style=PINNED, no_wrap=True, end="")


class QrCode(Widget):
    def __init__(self, payload: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.payload = payload
        self.matrix = qr_matrix(payload)
        self.text = half_block_text(self.matrix)
        self.styles.width, self.styles.height = self.cells_needed

    @property
    def cells_needed(self) -> tuple[int, int]:
        """(columns, rows) the code occupies."""
        return len(self.matrix[0]), (len(self.matrix) + 1) // 2

    def render(self) -> Text:
        return self.text

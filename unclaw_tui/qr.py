"""QR codes of client configs: a module matrix, terminal half blocks and PNG files.

Error correction L keeps a ~320-byte config at version 11 (61 modules), about 65 columns x 33
rows with half blocks, so it fits an ordinary terminal.  Half-block output pins both colours
(black on white), or a light terminal theme would invert the code and phones could not scan it.
"""

from __future__ import annotations

import io
from pathlib import Path

import qrcode
import qrcode.constants

from unclaw_tui.state import write_atomic

# 256-colour palette entries 16 (#000000) and 231 (#ffffff) sit in the fixed colour cube, which
# themes do not remap (unlike the 16 basic colours).  The basic 30/107 pair goes first as a
# fallback for terminals that ignore 256-colour codes.
ANSI_PIN = "\x1b[30;107m\x1b[38;5;16;48;5;231m"
ANSI_RESET = "\x1b[0m"

UPPER = "\u2580"  # ▀ dark top, light bottom
LOWER = "\u2584"  # ▄ light top, dark bottom
FULL = "\u2588"  # █ both dark


def qr_matrix(text: str, *, quiet_zone: int = 2) -> list[list[bool]]:
    """The smallest QR code (error correction L) of text's UTF-8 bytes; True = dark module."""
    if quiet_zone < 0:
        raise ValueError("quiet_zone must be >= 0")
    code = qrcode.QRCode(
        version=None, error_correction=qrcode.constants.ERROR_CORRECT_L, border=quiet_zone
    )
    code.add_data(text.encode("utf-8"))
    code.make(fit=True)
    return [list(row) for row in code.get_matrix()]


def _half_block_lines(matrix: list[list[bool]]) -> list[str]:
    width = len(matrix[0]) if matrix else 0
    light_row = [False] * width
    glyphs = {(False, False): " ", (True, False): UPPER, (False, True): LOWER, (True, True): FULL}
    lines = []
    for top_index in range(0, len(matrix), 2):
        top = matrix[top_index]
        bottom = matrix[top_index + 1] if top_index + 1 < len(matrix) else light_row
        lines.append("".join(glyphs[pair] for pair in zip(top, bottom, strict=True)))
    return lines


def render_half_blocks(text: str, *, ansi: bool = True) -> str:
    """The QR code as text, two module rows per line (dark = the glyph's foreground). With
    ansi=True every line is pinned black-on-white (see ANSI_PIN) and reset at its end; without,
    the glyphs assume a dark foreground on a light background."""
    lines = _half_block_lines(qr_matrix(text))
    if ansi:
        lines = [f"{ANSI_PIN}{line}{ANSI_RESET}" for line in lines]
    return "\n".join(lines) + "\n"


def qr_size(text: str) -> tuple[int, int]:
    """(columns, rows) that render_half_blocks(text) needs."""
    matrix = qr_matrix(text)
    return len(matrix[0]), (len(matrix) + 1) // 2


def save_png(text: str, path: Path, *, scale: int = 8) -> None:
    """Write the QR code as a black-on-white PNG (quiet zone included), atomically."""
    from PIL import Image  # only PNG output needs Pillow

    if scale < 1:
        raise ValueError("scale must be >= 1")
    matrix = qr_matrix(text, quiet_zone=4)
    size = len(matrix)
    image = Image.new("L", (size, size), 255)
    image.putdata([0 if dark else 255 for row in matrix for dark in row])
    image = image.resize((size * scale, size * scale), Image.Resampling.NEAREST)
    png = io.BytesIO()
    image.save(png, format="PNG")
    # The code holds the client's private key: readable by the owner only (0600).
    write_atomic(Path(path).absolute(), png.getvalue())

"""Turn the QR widget's drawn cells back into pixels, to decode them like a camera would."""

from __future__ import annotations

from PIL import Image
from rich.color import Color
from textual.geometry import Region

from unclaw_tui.widgets.qr_code import QrCode


def _rgb(color: Color | None) -> tuple[int, int, int]:
    assert color is not None, "every QR cell must carry an explicit colour"
    triplet = color.get_truecolor()
    return triplet.red, triplet.green, triplet.blue


def drawn_cells(
    widget: QrCode,
) -> list[list[tuple[str, tuple[int, int, int], tuple[int, int, int]]]]:
    """(glyph, foreground, background) of every cell as the widget renders it."""
    width, height = widget.cells_needed
    rows = []
    for strip in widget.render_lines(Region(0, 0, width, height)):
        row = []
        for segment in strip:
            style = segment.style
            assert style is not None
            for char in segment.text:
                row.append((char, _rgb(style.color), _rgb(style.bgcolor)))
        rows.append(row)
    return rows


def qr_image(widget: QrCode, scale: int = 6) -> Image.Image:
    """One pixel per module (two per cell vertically), scaled up, on extra white margin."""
    cells = drawn_cells(widget)
    width = len(cells[0])
    image = Image.new("RGB", (width, len(cells) * 2), (255, 255, 255))
    for y, row in enumerate(cells):
        for x, (char, fg, bg) in enumerate(row):
            top, bottom = {
                "▀": (fg, bg),
                "▄": (bg, fg),
                "█": (fg, fg),
                " ": (bg, bg),
            }[char]
            image.putpixel((x, 2 * y), top)
            image.putpixel((x, 2 * y + 1), bottom)
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    framed = Image.new("RGB", (big.width + 8 * scale, big.height + 8 * scale), (255, 255, 255))
    framed.paste(big, (4 * scale, 4 * scale))
    return framed

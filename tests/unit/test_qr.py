"""QR codes decode back to the exact config bytes: from the PNG and from the half-block text."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import decode_qr
from unclaw_tui import keys, qr, wgquick
from unclaw_tui.state import PeerRecord

ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def sample_config(ip: str = "10.77.0.2") -> str:
    private_key, public_key = keys.generate_keypair()
    _, gateway_public = keys.generate_keypair()
    peer = PeerRecord("phone", public_key, private_key, keys.generate_preshared_key(), ip, 0.0)
    return wgquick.client_config(peer, gateway_public, "203.0.113.77:51820", "10.77.0.1")


def image_from_matrix(matrix: list[list[bool]], scale: int = 6, border: int = 4) -> Image.Image:
    size_x, size_y = len(matrix[0]) + 2 * border, len(matrix) + 2 * border
    image = Image.new("L", (size_x, size_y), 255)
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            if dark:
                image.putpixel((x + border, y + border), 0)
    return image.resize((size_x * scale, size_y * scale), Image.Resampling.NEAREST)


def matrix_from_half_blocks(text: str) -> list[list[bool]]:
    """Rasterise half-block text back into modules, as a terminal would draw it."""
    glyph = {" ": (False, False), qr.UPPER: (True, False), qr.LOWER: (False, True)}
    glyph[qr.FULL] = (True, True)
    rows: list[list[bool]] = []
    for line in text.rstrip("\n").split("\n"):
        pairs = [glyph[ch] for ch in ANSI_RE.sub("", line)]
        rows.append([top for top, _ in pairs])
        rows.append([bottom for _, bottom in pairs])
    return rows


def decoded_bytes(image: Image.Image) -> bytes:
    (data,) = decode_qr(image)
    return data


def test_png_decodes_to_exact_config(tmp_path: Path) -> None:
    text = sample_config()
    path = tmp_path / "phone.png"
    qr.save_png(text, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["phone.png"]
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == 255  # quiet zone is white
        assert decoded_bytes(image) == text.encode()


def test_png_decodes_with_zbarimg(tmp_path: Path) -> None:
    text = sample_config()
    path = tmp_path / "phone.png"
    qr.save_png(text, path, scale=4)
    result = subprocess.run(
        ["zbarimg", "--raw", "-q", "-Sbinary", str(path)], capture_output=True, check=True
    )
    assert result.stdout == text.encode()


@pytest.mark.parametrize("ansi", [True, False])
def test_half_blocks_decode_to_exact_config(ansi: bool) -> None:
    text = sample_config()
    rendered = qr.render_half_blocks(text, ansi=ansi)
    modules = matrix_from_half_blocks(rendered)
    assert decoded_bytes(image_from_matrix(modules)) == text.encode()


def test_half_blocks_match_matrix() -> None:
    text = sample_config()
    matrix = qr.qr_matrix(text)
    rows = matrix_from_half_blocks(qr.render_half_blocks(text, ansi=False))
    # An odd module count is padded with one light row at the bottom.
    assert rows[: len(matrix)] == matrix
    assert all(not dark for row in rows[len(matrix) :] for dark in row)


def test_ansi_pins_both_colours_on_every_line() -> None:
    text = sample_config()
    lines = qr.render_half_blocks(text, ansi=True).rstrip("\n").split("\n")
    plain = qr.render_half_blocks(text, ansi=False).rstrip("\n").split("\n")
    assert len(lines) == len(plain)
    for line, bare in zip(lines, plain, strict=True):
        assert line.startswith(qr.ANSI_PIN)
        assert line.endswith(qr.ANSI_RESET)
        assert ANSI_RE.sub("", line) == bare
    # black foreground (30 / palette 16) on white background (107 / palette 231)
    assert "30;107" in qr.ANSI_PIN
    assert "38;5;16" in qr.ANSI_PIN
    assert "48;5;231" in qr.ANSI_PIN
    assert "\x1b" not in "".join(plain)


def test_matrix_has_quiet_zone() -> None:
    matrix = qr.qr_matrix("hello", quiet_zone=3)
    size = len(matrix)
    assert all(len(row) == size for row in matrix)
    for i in range(3):
        assert not any(matrix[i]) and not any(matrix[size - 1 - i])
        assert not any(row[i] or row[size - 1 - i] for row in matrix)
    assert any(matrix[3])
    assert len(qr.qr_matrix("hello", quiet_zone=0)) == size - 6


def test_config_size_fits_a_terminal() -> None:
    text = sample_config()
    assert 300 <= len(text.encode()) <= 330
    # version 11 (61 modules) + 2 x 2 quiet zone: 65 columns, 33 rows
    assert qr.qr_size(text) == (65, 33)
    rendered = qr.render_half_blocks(text, ansi=False).rstrip("\n").split("\n")
    assert len(rendered) == 33
    assert {len(line) for line in rendered} == {65}


def test_qr_size_matches_render_for_small_text() -> None:
    cols, rows = qr.qr_size("x")
    rendered = qr.render_half_blocks("x", ansi=False).rstrip("\n").split("\n")
    assert (cols, rows) == (len(rendered[0]), len(rendered))


def test_save_png_into_missing_dir_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        qr.save_png("x", tmp_path / "missing" / "x.png")
    assert list(tmp_path.iterdir()) == []

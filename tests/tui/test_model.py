"""The console's Textual-free model and formatting, and the live table's in-place updates."""

from __future__ import annotations

import random

from textual.app import App, ComposeResult

from tests.tui.fake_gateway import FIXED_NOW, FakeGateway
from unclaw_tui import events as ev
from unclaw_tui.widgets.format import fmt_ago, fmt_bytes, sparkline
from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import ConnectionsModel, PeersModel, RowStore


def test_formatting() -> None:
    assert fmt_bytes(1023) == "1023 B"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_ago(FIXED_NOW - 12, FIXED_NOW) == "12 s ago"
    assert fmt_ago(None, FIXED_NOW) == "never"
    assert sparkline([0, 1, 2, 4], 6) == "  ▁▃▅█"
    assert sparkline([], 3) == "   "


def test_row_store_reports_each_change_once() -> None:
    store: RowStore[int] = RowStore()
    store.put("a", 1)
    store.put("b", 2)
    store.put("a", 3)
    assert store.take_changes() == ["a", "b"]
    assert store.take_changes() == []
    store.remove("b")
    store.remove("missing")
    assert store.take_changes() == ["b"]
    assert list(store) == ["a"]


def test_peer_rates_sampled_once_per_second() -> None:
    gw = FakeGateway()
    gw.add_peer("phone")
    model = PeersModel()
    model.update(gw.snapshot(), FIXED_NOW)
    gw.set_peer("phone", rx_bytes=1000, tx_bytes=1000)
    model.update(gw.snapshot(), FIXED_NOW + 0.5)  # too soon: no sample
    row = model.store.get(gw.peers["phone"].public_key)
    assert row is not None and row.history == ()
    model.update(gw.snapshot(), FIXED_NOW + 1.0)
    row = model.store.get(gw.peers["phone"].public_key)
    assert row is not None and row.rate == 2000.0 and row.history == (2000.0,)
    assert list(model.total_history) == [2000.0]
    gw.remove_peer("phone")
    model.update(gw.snapshot(), FIXED_NOW + 2)
    assert len(model.store) == 0


def _opened(i: int, ts: float) -> ev.TcpOpened:
    return ev.TcpOpened(
        ts=ts, conn_id=i, peer="p", peer_public_key="k", peer_ip="10.77.0.2",
        dst_ip="10.78.0.1", dst_port=443,
    )  # fmt: skip


def _closed(i: int, ts: float, error: str | None = None) -> ev.TcpClosed:
    return ev.TcpClosed(
        ts=ts, conn_id=i, peer="p", peer_public_key="k", peer_ip="10.77.0.2",
        dst_ip="10.78.0.1", dst_port=443, bytes_up=1, bytes_down=2, duration=1.0, error=error,
    )  # fmt: skip


def test_connections_close_expire_and_stay_bounded() -> None:
    model = ConnectionsModel(max_rows=3, closed_ttl=60)
    model.opened(_opened(1, 0))
    model.opened(_opened(2, 0))
    model.closed(_closed(1, 10, "reset"))
    row = model.store.get("t1")
    assert row is not None and row.closed_at == 10 and row.error == "reset"
    model.prune(69.9)
    assert "t1" in model.store
    model.prune(70)
    assert "t1" not in model.store
    # Over the bound, closed flows go before open ones.
    model.opened(_opened(3, 80))
    model.closed(_closed(3, 81))
    model.opened(_opened(4, 82))
    model.opened(_opened(5, 83))
    assert list(model.store) == ["t2", "t4", "t5"]
    # A close whose open was lost still shows, with its start derived from the duration.
    model = ConnectionsModel()
    model.closed(_closed(9, 100))
    row = model.store.get("t9")
    assert row is not None and row.opened_at == 99.0


class NumberTable(LiveTable[int]):
    COLUMNS = (("n", "N"), ("square", "Square"))

    def cells(self, row: int, now: float) -> tuple[Cell, ...]:
        return ((str(row), ""), (str(row * row), "bold" if row % 2 else ""))

    def search_text(self, row: int) -> str:
        return str(row)


class TableApp(App[None]):
    def __init__(self, store: RowStore[int]) -> None:
        super().__init__()
        self.store = store

    def compose(self) -> ComposeResult:
        yield NumberTable(self.store)


async def test_live_table_bulk_removal_matches_store_and_keeps_selection() -> None:
    store: RowStore[int] = RowStore()
    for i in range(500):
        store.put(f"k{i}", i)
    app = TableApp(store)
    async with app.run_test(size=(60, 20)) as pilot:
        table = app.query_one(NumberTable)
        table.sync(0)
        await pilot.pause()
        table.move_cursor(row=400)
        rng = random.Random(5)
        doomed = rng.sample([f"k{i}" for i in range(500) if i != 400], 300)
        for key in doomed:
            store.remove(key)
        store.put("k7", 7) if "k7" in store else None
        store.put("k1000", 1000)
        table.sync(0)
        await pilot.pause()
        assert table.shown_keys() == list(store)
        assert [table.get_row_index(k) for k in store] == list(range(len(store)))
        assert table.selected_key == "k400"
        assert table.cell_text("k1000", "square") == "1000000"
        # In-place update of one cell, and a filter rebuild that keeps the selection.
        store.put("k400", 401)
        table.sync(0)
        assert table.cell_text("k400", "square") == str(401 * 401)
        table.set_filter("40", 0)
        assert all("40" in table.cell_text(k, "n") for k in table.shown_keys())
        assert table.selected_key == "k400"


def test_open_connections_take_live_byte_counts_and_closed_ones_keep_their_final() -> None:
    model = ConnectionsModel()
    model.opened(_opened(1, 0))
    model.opened(_opened(2, 0))
    model.closed(_closed(2, 5))
    model.store.take_changes()
    model.live_bytes({1: (100, 5000), 2: (999, 999), 3: (7, 7)})  # 3: never seen, ignored
    row1, row2 = model.store.get("t1"), model.store.get("t2")
    assert row1 is not None and (row1.bytes_up, row1.bytes_down) == (100, 5000)
    assert row2 is not None and (row2.bytes_up, row2.bytes_down) == (1, 2)
    assert "t3" not in model.store
    assert list(model.store.take_changes()) == ["t1"]
    model.live_bytes({1: (100, 5000)})  # unchanged: no redraw
    assert list(model.store.take_changes()) == []

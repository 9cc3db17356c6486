"""A DataTable kept up to date in place from a `RowStore`, for panes with thousands of rows.

Live updates only touch the rows that changed (`sync`) and, for time-dependent text such as
"12 s ago", only the rows on screen (`refresh_visible`). The table is rebuilt only when the
operator changes what it shows (filter, scope). The selected row is tracked by key, so it
survives inserts and removals, and the viewport stays on the same rows.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar, Generic, Self, TypeVar

from rich.text import Text, TextType
from textual._two_way_dict import TwoWayDict
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import CellKey, ColumnKey, Row, RowKey

from unclaw_tui.widgets.model import RowStore

R = TypeVar("R")

# A cell as the pane computes it: (text, rich style). Compared before any Text is built.
Cell = tuple[str, str]


class LiveTable(DataTable[Text], Generic[R]):
    COLUMNS: ClassVar[tuple[tuple[str, str], ...]] = ()  # (column key, label)
    # Re-render the on-screen rows at every refresh (their text depends on the clock).
    TIME_DEPENDENT: ClassVar[bool] = False
    # Keep the cursor on the newest row while it is there already, like `tail -f`.
    FOLLOW_TAIL: ClassVar[bool] = False

    # Class-level defaults: DataTable.__init__ already reads ordered_rows.
    # Bumped when rows are added, removed or reordered (not when a cell changes).
    _rows_version: int = 0
    _ordered_cache: tuple[tuple[int, int], list[Row[Text]]] | None = None
    _offsets_cache: tuple[tuple[int, int], list[tuple[RowKey, int]]] | None = None

    def __init__(self, store: RowStore[R], *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self.store = store
        self.filter_text = ""
        self._shown: dict[str, tuple[Cell, ...]] = {}

    def on_mount(self) -> None:
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    # -- row order caches ----------------------------------------------------------------------
    # DataTable keys its row-order and line-offset caches on a counter that every update_cell
    # bumps, so one changed cell makes the next frame walk all rows (tens of ms at 10,000).
    # Rows here are always one line high and never sorted, so the order only changes with
    # the row set; these caches follow that instead.

    @property
    def ordered_rows(self) -> list[Row[Text]]:
        key = (self._rows_version, self.row_count)
        if self._ordered_cache is None or self._ordered_cache[0] != key:
            self._ordered_cache = (key, super().ordered_rows)
        return self._ordered_cache[1]

    @property
    def _y_offsets(self) -> list[tuple[RowKey, int]]:
        key = (self._rows_version, self.row_count)
        if self._offsets_cache is None or self._offsets_cache[0] != key:
            self._offsets_cache = (key, [(row.key, 0) for row in self.ordered_rows])
        return self._offsets_cache[1]

    def add_row(
        self,
        *cells: Text,
        height: int | None = 1,
        key: str | None = None,
        label: TextType | None = None,
    ) -> RowKey:
        assert height == 1, "the row caches assume one-line rows"
        self._rows_version += 1
        return super().add_row(*cells, height=height, key=key, label=label)

    def remove_row(self, row_key: RowKey | str) -> None:
        self._rows_version += 1
        super().remove_row(row_key)

    def clear(self, columns: bool = False) -> Self:
        self._rows_version += 1
        return super().clear(columns)

    # -- what a pane defines ------------------------------------------------------------------

    def cells(self, row: R, now: float) -> tuple[Cell, ...]:
        raise NotImplementedError

    def search_text(self, row: R) -> str:
        raise NotImplementedError

    def in_scope(self, row: R) -> bool:
        return True

    # -- queries -------------------------------------------------------------------------------

    def matches(self, row: R) -> bool:
        if not self.in_scope(row):
            return False
        needle = self.filter_text.lower()
        return not needle or needle in self.search_text(row).lower()

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0))
        except Exception:  # the cursor is outside the table while it is being rebuilt
            return None
        return row_key.value

    def shown_keys(self) -> list[str]:
        """Keys of the rows in the table, top to bottom."""
        return [row.key.value or "" for row in self.ordered_rows]

    def cell_text(self, key: str, column: str) -> str:
        value = self.get_cell(key, column)
        return value.plain if isinstance(value, Text) else str(value)

    # -- updates ---------------------------------------------------------------------------------

    def sync(self, now: float) -> None:
        """Apply the store's changes since the last sync: add, update, remove rows."""
        changes = self.store.take_changes()
        if not changes:
            return
        follow = self.FOLLOW_TAIL and (self.row_count == 0 or self.cursor_row >= self.row_count - 1)
        doomed: list[str] = []
        changed = False
        for key in changes:
            row = self.store.get(key)
            if row is None or not self.matches(row):
                if key in self._shown:
                    doomed.append(key)
                continue
            if key in self._shown:
                changed = self._update_row(key, self.cells(row, now)) or changed
            else:
                self._add(key, row, now)
        if changed:
            self._cells_changed()
        self.remove_rows(doomed)
        if follow and self.row_count:
            self.move_cursor(row=self.row_count - 1)

    def refresh_visible(self, now: float) -> None:
        """Re-render the rows in the viewport (clock-dependent text)."""
        if not self.TIME_DEPENDENT or not self.row_count:
            return
        top = int(self.scroll_y)
        ordered = self.ordered_rows[top : top + max(1, self.size.height)]
        changed = False
        for key in [row.key.value for row in ordered]:
            assert key is not None
            row = self.store.get(key)
            if row is not None and key in self._shown:
                changed = self._update_row(key, self.cells(row, now)) or changed
        if changed:
            self._cells_changed()

    def rebuild(self, now: float) -> None:
        """Show exactly the store's matching rows (after a filter or scope change)."""
        selected = self.selected_key
        self.store.take_changes()  # everything is read below
        self.clear()
        self._shown.clear()
        for key, row in self.store.items():
            if self.matches(row):
                self._add(key, row, now)
        if selected is not None and selected in self._shown:
            self.move_cursor(row=self.get_row_index(selected))

    def set_filter(self, text: str, now: float) -> None:
        if text != self.filter_text:
            self.filter_text = text
            self.rebuild(now)

    def _add(self, key: str, row: R, now: float) -> None:
        cells = self._shown[key] = self.cells(row, now)
        self.add_row(*(Text(t, style=s) for t, s in cells), key=key)

    def _update_row(self, key: str, cells: tuple[Cell, ...]) -> bool:
        """Put changed cells in place; the caller calls `_cells_changed()` once after."""
        old = self._shown[key]
        if old == cells:
            return False
        # What update_cell does, minus its refresh() per cell: one refresh per pass is
        # enough, and at a thousand changed rows a tick the per-cell refresh dominated.
        row_key = RowKey(key)
        data = self._data[row_key]
        for (column, _), before, after in zip(self.COLUMNS, old, cells, strict=True):
            if before != after:
                data[ColumnKey(column)] = Text(after[0], style=after[1])
                if len(after[0]) > len(before[0]):
                    # A wider value (an endpoint learnt, a counter grown): let the column grow.
                    self._updated_cells.add(CellKey(row_key, ColumnKey(column)))
                    self._require_update_dimensions = True
        self._shown[key] = cells
        return True

    def _cells_changed(self) -> None:
        self._update_count += 1  # drops DataTable's rendered-line caches
        self.refresh()

    def remove_rows(self, keys: Collection[str]) -> None:
        """Remove rows in one pass; DataTable.remove_row re-indexes every row per call."""
        doomed = {key for key in keys if key in self._shown}
        if not doomed:
            return
        selected = self.selected_key
        top = int(self.scroll_y)
        removed_above = sum(
            1
            for key in doomed
            if (index := self._row_locations.get(RowKey(key))) is not None and index < top
        )
        for key in doomed:
            del self._shown[key]
        if len(doomed) <= 2:
            for key in doomed:
                self.remove_row(key)
        else:
            self._remove_rows_bulk({RowKey(key) for key in doomed})
        if selected is not None and selected in self._shown:
            self.move_cursor(row=self.get_row_index(selected), scroll=False)
        if removed_above:
            self.scroll_to(y=max(0, top - removed_above), animate=False, immediate=True)

    def _remove_rows_bulk(self, doomed: set[RowKey]) -> None:
        # The same bookkeeping as DataTable.remove_row, once for all rows.
        survivors = sorted(
            (index, key)
            for key in self._row_locations
            if key not in doomed and (index := self._row_locations.get(key)) is not None
        )
        self._row_locations = TwoWayDict(
            {key: new_index for new_index, (_, key) in enumerate(survivors)}
        )
        for row_key in doomed:
            for column_key in self._data.get(row_key, {}):
                self._updated_cells.discard(CellKey(row_key, column_key))
            self.rows.pop(row_key, None)
            self._data.pop(row_key, None)
        self._require_update_dimensions = True
        self._rows_version += 1
        self.cursor_coordinate = self.cursor_coordinate
        self.hover_coordinate = self.hover_coordinate
        self._update_count += 1
        self.check_idle()
        self.refresh(layout=True)

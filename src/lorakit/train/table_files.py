"""Tabular data files as rows: CSV (a header line naming the columns) and Parquet (through pyarrow, when installed).
Each row is (line, {column: value}); `line` is where the row starts in the file (Parquet: the row's index + 1)."""

from __future__ import annotations

import csv
import io


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


def csv_rows(path: str, text: str) -> list[tuple[int, dict]]:
    """A CSV file with a header line: one row per record, its columns as string fields (line = where it starts)."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (expected a header line naming the columns)")
    rows = []
    for start in iter(lambda: reader.line_num + 1, None):
        try:
            rows.append((start, dict(next(reader))))
        except StopIteration:
            return rows
        except csv.Error as e:
            raise DataError(f"{path}:{start}: invalid CSV ({e})") from None


def parquet_rows(path: str) -> list[tuple[int, dict]]:
    """A Parquet file's records (row index + 1 as the 'line'); needs pyarrow."""
    try:
        import pyarrow.parquet as pq  # imports inside functions: only Parquet data needs pyarrow
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give JSONL/CSV") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors for a file that is not Parquet vary by version
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return list(enumerate(records, start=1))

"""Key/value caches of the serving engine, passed to the model as its `cache`.

- `BatchCache`: the running batch. One buffer per layer, (slots, heads, columns, head_dim); every row's tokens
  end at the same column (`end`), so a decoding step writes one column for all rows and attends over a view
  of the buffer (no copy of the cache per step, unlike concatenation). A row that joins is copied in once,
  right-aligned at `end`; a row that leaves is replaced by the last row (one row copied). Columns left of every
  row are dropped when the buffer fills (`_compact`), the buffer grows when a row needs more.
- `RowCache`: one sequence while its prompt is prefilled, chunk by chunk (batch of one).
- The masks are built here too (4-D, so the model uses them as they are): a row attends to its own columns.
"""

from __future__ import annotations

import torch


def attention_mask(allowed: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor:
    """(batch, 1, queries, keys) from a boolean `allowed` (batch, queries, keys): bool for SDPA, additive for
    eager attention."""
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


class RowCache:
    """Keys and values of one sequence, grown by concatenation (a prompt is prefilled in a few chunks).
    `prefix`: per layer (key, value) of a cached prefix, (1, heads, tokens, head_dim), never written to."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers = [list(kv) for kv in prefix] if prefix else []
        self.length = prefix[0][0].shape[2] if prefix else 0

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.layers):
            self.layers.append([key, value])
        else:
            kv = self.layers[layer_idx]
            kv[0], kv[1] = torch.cat([kv[0], key], dim=2), torch.cat([kv[1], value], dim=2)
        return self.layers[layer_idx][0], self.layers[layer_idx][1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def chunk_mask(self, n: int, dtype, implementation: str) -> torch.Tensor:
        """Causal mask for the next `n` tokens after the `length` already cached."""
        keys = torch.arange(self.length + n)
        queries = torch.arange(self.length, self.length + n)
        return attention_mask((keys[None, :] <= queries[:, None])[None], dtype, implementation)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class BatchCache:
    """The running batch's keys and values; row i of the batch is slot i (rows 0..n-1 are live)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # (slots, columns): which columns hold a row's tokens
        self.lengths: list[int] = []  # tokens cached per live row
        self.end = 0  # the next column a decoding step writes

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def start(self) -> int:
        """The first column any live row uses."""
        return self.end - max(self.lengths) if self.lengths else self.end

    def column_bytes(self) -> int:
        """Bytes of one token of one row, all layers, keys and values."""
        return sum(2 * k[0, :, 0].numel() * k.element_size() for k in self.keys)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def used_bytes(self) -> int:
        return sum(self.lengths) * self.column_bytes() if self.keys else 0

    def _allocate(self, slots: int, columns: int, new_end: int, like: list) -> None:
        """New buffers of (slots, columns); the live rows copied over, still right-aligned, ending at `new_end`."""
        start, width = self.start(), self.end - self.start()
        keys, values = [], []
        for layer, (k, _) in enumerate(like):
            shape = (slots, k.shape[1], columns, k.shape[3])
            nk, nv = k.new_zeros(shape), k.new_zeros(shape)
            if self.lengths:
                nk[: self.rows, :, new_end - width: new_end] = self.keys[layer][: self.rows, :, start: self.end]
                nv[: self.rows, :, new_end - width: new_end] = self.values[layer][: self.rows, :, start: self.end]
            keys.append(nk)
            values.append(nv)
        valid = torch.zeros(slots, columns, dtype=torch.bool)
        if self.lengths:
            valid[: self.rows, new_end - width: new_end] = self.valid[: self.rows, start: self.end]
        self.keys, self.values, self.valid, self.end = keys, values, valid, new_end

    def _fit(self, slots: int, length: int, max_slots: int, like: list | None = None) -> None:
        """Room for `slots` rows, one of them `length` tokens long (right-aligned at `end`), and the next
        decoding column: compacted (columns no row uses dropped) or grown when needed."""
        have_slots, have_columns = self.valid.shape if self.keys else (0, 0)
        if slots <= have_slots and length <= self.end < have_columns:
            return
        like = like or list(zip(self.keys, self.values))
        new_end = max(self.end - self.start(), length)
        if slots <= have_slots and new_end < have_columns:
            return self._allocate(have_slots, have_columns, new_end, like)
        new_slots = min(max_slots, max(slots, 2 * have_slots))
        self._allocate(new_slots, max(new_end + 1, int(have_columns * 1.5), 64), new_end, like)

    def add(self, row: RowCache, length: int, max_slots: int) -> None:
        """Copy a prefilled row in as the last row (its first `length` tokens)."""
        self._fit(self.rows + 1, length, max_slots, row.layers)
        i = self.rows
        for layer, (k, v) in enumerate(row.layers):
            self.keys[layer][i, :, self.end - length: self.end] = k[0, :, :length]
            self.values[layer][i, :, self.end - length: self.end] = v[0, :, :length]
        self.valid[i] = False
        self.valid[i, self.end - length: self.end] = True
        self.lengths.append(length)

    def remove(self, i: int) -> None:
        """Drop row i: the last row moves into its slot."""
        last = self.rows - 1
        if i != last:
            for buf in (*self.keys, *self.values):
                buf[i] = buf[last]
            self.valid[i] = self.valid[last]
            self.lengths[i] = self.lengths[last]
        self.valid[last] = False
        self.lengths.pop()
        if not self.lengths:
            self.end = 0

    def row(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's keys and values, (1, heads, tokens, head_dim) per layer (copies)."""
        a, b = self.end - self.lengths[i], self.end
        return [(k[i: i + 1, :, a:b].clone(), v[i: i + 1, :, a:b].clone()) for k, v in zip(self.keys, self.values)]

    def step_mask(self, dtype, implementation: str) -> torch.Tensor:
        """Before a decoding step: make room for its column; the mask of the step (rows, 1, 1, columns)."""
        if self.end >= self.valid.shape[1]:
            self._fit(self.rows, 1, self.valid.shape[0])
        self.valid[: self.rows, self.end] = True
        return attention_mask(self.valid[: self.rows, None, self.start(): self.end + 1], dtype, implementation)

    def update(self, key, value, layer_idx, *args, **kwargs):
        """One decoding step's keys/values (rows, heads, 1, head_dim) for one layer, written at `end`."""
        n, start = self.rows, self.start()
        self.keys[layer_idx][:n, :, self.end] = key[:, :, 0]
        self.values[layer_idx][:n, :, self.end] = value[:, :, 0]
        return self.keys[layer_idx][:n, :, start: self.end + 1], self.values[layer_idx][:n, :, start: self.end + 1]

    def advance(self) -> None:
        """After a decoding step: every row has one more token."""
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end - self.start()

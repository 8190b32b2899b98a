"""StreamingLLM key/value cache: attention sinks plus a rolling window (Xiao et al. 2023).

Why keys are stored rotated by their absolute index, and why that is exact:
RoPE scores depend only on the distance between query and key. With T the stream index
of the query and t_oldest the oldest window token, the query's in-cache position is
m = sink + (T - t_oldest) and a window key's is p = sink + (t - t_oldest), so m - p = T - t:
for window keys the in-cache rotation *is* the absolute rotation. Only sink keys differ:
they sit at 0..sink-1 (= their absolute indices) while the query sits at m. So every key
is rotated once, at insertion, by its absolute index; the model rotates the query twice,
by T for window keys and by m for sink keys, one softmax over both. The query is itself
the newest window token, so t_oldest = max(sink, T + 1 - window) and m = min(T, sink +
window - 1). No key is ever re-rotated, so there is no rounding drift, and the window is
a ring written in place (attention over a set of slots does not care about their order).
sink=0 gives plain window attention, the paper's failing baseline.
"""

from __future__ import annotations

import torch


class SinkCache:
    """One session's keys and values: the first `sink` tokens and the last `window` tokens.

    Storage is preallocated once; slots 0..sink-1 hold the sinks, slots sink.. are a ring
    buffer over the window. The model writes with `update`, reads with `fetch`, and calls
    `advance` once per forward pass.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        sink: int = 4,
        window: int = 1020,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if sink < 0 or window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink}, window={window}")
        self.sink = sink
        self.window = window
        self.tokens_seen = 0  # tokens appended since the last reset, evicted ones included
        shape = (n_layers, n_kv_heads, sink + window, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # [L, H, S, D], rotated
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [L, H, S, D]

    @property
    def fill(self) -> int:
        """Number of tokens held (sinks + window), at most `sink + window`."""
        return min(self.tokens_seen, self.sink + self.window)

    def positions(self) -> torch.Tensor:
        """Stream index of the token held in each filled slot.  # [fill]"""
        s = torch.arange(self.fill, device=self.keys.device)
        seen = self.tokens_seen - self.sink  # window tokens appended so far
        # A ring slot holds the latest window token that maps to it.
        latest = (
            s + (seen - 1 - (s - self.sink)).div(self.window, rounding_mode="floor") * self.window
        )
        return torch.where(s < self.sink, s, latest)

    def query_position(self, t: int) -> int:
        """In-cache position of the query for stream index t, used against the sink keys."""
        return min(t, self.sink + self.window - 1)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the pending tokens' keys/values (`# [H, C, D]`, stream order) for one layer."""
        count, start = keys.shape[1], self.tokens_seen
        n_sink = max(0, min(count, self.sink - start))
        # Of the chunk's window tokens only the last `window` survive; the ring wraps at most once.
        keep = min(count - n_sink, self.window)
        slot = self.sink + (start + count - keep - self.sink) % self.window
        head = min(keep, self.sink + self.window - slot)  # tokens written before the wrap
        cut = count - keep + head
        for dst, lo, hi in ((start, 0, n_sink), (slot, count - keep, cut), (self.sink, cut, count)):
            if hi > lo:  # plain slice writes: no index tensors, no concatenation
                self.keys[layer, :, dst : dst + hi - lo] = keys[:, lo:hi]
                self.values[layer, :, dst : dst + hi - lo] = values[:, lo:hi]

    def fetch(self, layer: int, pending: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's filled slots, sinks first.  # [H, n, D]

        `pending`: tokens already written by `update` but not yet `advance`d (decode writes
        its token, then attends over it).
        """
        n = min(self.tokens_seen + pending, self.sink + self.window)
        return self.keys[layer, :, :n], self.values[layer, :, :n]

    def advance(self, count: int) -> None:
        """Commit `count` tokens written by `update` to every layer."""
        self.tokens_seen += count

    def reset(self) -> None:
        """Forget every token; storage is kept and reused."""
        self.tokens_seen = 0

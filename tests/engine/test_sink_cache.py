"""SinkCache: which tokens it keeps, where, and that its memory never grows."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from engine import Model, SinkCache


def stream(cache: SinkCache, chunks: list[int]) -> None:
    """Append chunks of tokens whose key and value carry their own stream index."""
    for size in chunks:
        t = torch.arange(cache.tokens_seen, cache.tokens_seen + size, dtype=torch.float32)
        kv = t[None, :, None].expand(cache.keys.shape[1], size, cache.keys.shape[3])  # [H, C, D]
        for layer in range(cache.keys.shape[0]):
            cache.update(layer, kv, kv)
        cache.advance(size)


def kept(cache: SinkCache) -> list[int]:
    """Stream indices of the tokens held, read back from storage."""
    keys, values = cache.fetch(0)
    assert torch.equal(keys, values)
    return sorted(int(i) for i in keys[0, :, 0])


@pytest.mark.parametrize("chunks", [[1] * 50, [7, 1, 30, 12], [50], [2, 1, 1, 46]])
@pytest.mark.parametrize("sink", [0, 1, 4])
def test_keeps_first_sink_and_last_window_tokens(chunks: list[int], sink: int) -> None:
    """After any mix of chunk sizes the cache holds tokens 0..sink-1 and the last `window`."""
    cache = SinkCache(2, 2, 3, sink=sink, window=8)
    stream(cache, chunks)
    expected = list(range(sink)) + list(range(50 - 8, 50))
    assert cache.tokens_seen == 50
    assert cache.fill == sink + 8
    assert kept(cache) == expected
    assert sorted(cache.positions().tolist()) == expected
    assert cache.positions().tolist() == cache.fetch(0)[0][0, :, 0].long().tolist()


def test_sink_zero_is_plain_window_attention() -> None:
    """sink=0 keeps only the most recent `window` tokens (the paper's failing baseline)."""
    cache = SinkCache(1, 1, 3, sink=0, window=5)
    for n in range(1, 20):
        stream(cache, [1])
        assert kept(cache) == list(range(max(0, n - 5), n))


def test_before_the_first_eviction_everything_is_kept_in_order() -> None:
    cache = SinkCache(1, 1, 3, sink=4, window=8)
    stream(cache, [3, 5])
    assert cache.fill == 8
    assert cache.positions().tolist() == list(range(8))


def test_reset_forgets_tokens_and_keeps_storage() -> None:
    cache = SinkCache(1, 1, 3, sink=2, window=4)
    ptr = cache.keys.data_ptr()
    stream(cache, [9])
    cache.reset()
    assert (cache.tokens_seen, cache.fill) == (0, 0)
    stream(cache, [3])
    assert kept(cache) == [0, 1, 2]
    assert cache.keys.data_ptr() == ptr


def test_rejects_an_empty_window() -> None:
    with pytest.raises(ValueError, match="window"):
        SinkCache(1, 1, 3, sink=4, window=0)


def test_memory_never_grows(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    """Streaming 10x the cache size through the model reuses the same storage."""
    _, model = tiny
    cache = model.new_cache(sink=4, window=12)
    before = [(t.shape, t.data_ptr()) for t in (cache.keys, cache.values)]
    tokens = torch.randint(0, 128, (160,))
    model.prefill(tokens[:37], cache, chunk_size=16)
    for token in tokens[37:]:
        model.decode_one_token(int(token), cache)
    assert cache.tokens_seen == 160 == 10 * (4 + 12)
    assert cache.fill == 16
    assert [(t.shape, t.data_ptr()) for t in (cache.keys, cache.values)] == before

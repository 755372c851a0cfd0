"""A minimal simulated inference engine: a KV block pool with prefix reuse and a TTFT model.

It holds block hashes in an LRU pool of fixed capacity and charges prefill time only for
blocks it does not already hold (decode is not modelled yet). Used by `cache-plane demo`; the vLLM-compatible HTTP
simulator of issue 5 builds on the same model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class SimEngine:
    """One engine's KV pool and cost model (milliseconds)."""

    node_id: str
    capacity_blocks: int
    block_size: int = 16
    prefill_ms_per_token: float = 0.1
    pool: OrderedDict[int, None] = field(default_factory=OrderedDict)
    active: int = 0

    def admit(self, blocks: list[int]) -> tuple[int, list[int], list[int]]:
        """Take a prompt's blocks: return (reused blocks from 0, stored, evicted)."""
        reused = 0
        for block in blocks:
            if block not in self.pool:
                break
            reused += 1
        stored, evicted = [], []
        for block in blocks:
            if block in self.pool:
                self.pool.move_to_end(block)
                continue
            if len(self.pool) >= self.capacity_blocks:
                victim, _ = self.pool.popitem(last=False)
                evicted.append(victim)
            self.pool[block] = None
            stored.append(block)
        return reused, stored, evicted

    def ttft_ms(self, prompt_tokens: int, reused_blocks: int) -> float:
        """Time to first token: prefill of the tokens not covered by reused blocks."""
        uncached = max(prompt_tokens - reused_blocks * self.block_size, 0)
        return uncached * self.prefill_ms_per_token

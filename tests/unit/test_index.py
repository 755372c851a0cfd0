"""PrefixIndex on its own: prefix lookup, export and restore (pure)."""

from __future__ import annotations

from cache_plane.index import CPU, DISK, GPU, PENDING, PrefixIndex


def test_prefix_hint_changes_speed_never_the_answer():
    """A right, wrong, out-of-range or absent hint gives the same prefix length."""
    idx = PrefixIndex()
    idx.add(0, [1, 2, 3, 5], GPU)
    keys = [1, 2, 3, 4, 5]
    for hint in (None, -1, 0, 1, 2, 3, 4, 5, 6, 100):
        assert idx.prefix(0, keys, hint) == 3
    assert idx.prefix(0, [1, 2, 3], 3) == 3 and idx.prefix(0, [9, 1], 1) == 0


def test_export_then_restore_gives_the_same_node():
    """Keys in LRU order, touch times, tiers and pending blocks survive export/restore."""
    idx = PrefixIndex()
    idx.add(0, [1, 2], GPU, 5)
    idx.add(0, [3], CPU, 6)
    idx.add(0, [4], DISK, 7)
    idx.add(0, [5 | 1 << 64], PENDING, 8)
    idx.touch_held(0, [1], 9)
    keys, times, tiers = idx.export(0)
    assert keys == [2, 3, 4, 5 | 1 << 64, 1] and times == [5, 6, 7, 8, 9]
    assert list(tiers) == [GPU, CPU, DISK, PENDING, GPU]
    twin = PrefixIndex()
    twin.add(0, [99], GPU)
    twin.restore(0, keys, times, tiers)
    assert twin.export(0) == (keys, times, tiers)
    assert [twin.tier(0, 3, 0), twin.tier(1, 5, 0), twin.tier(0, 1, 0)] == [CPU, PENDING, GPU]
    twin.restore(0, [], [], b"")
    assert twin.used(0) == 0 and twin.export(0) == ([], [], b"")

"""cache_plane: KV-cache aware routing, placement and eviction on top of veristore_py."""

"""Response cache: keys, cacheability, semantic matching (pure) and the gateway's stores."""

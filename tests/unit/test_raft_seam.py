"""The PySyncObj seam fails loudly on a PySyncObj it was not written for."""

from __future__ import annotations

import pytest

from veristore_py import raft


def test_another_pysyncobj_version_is_refused_at_import(monkeypatch):
    """A version other than the pinned one is an ImportError naming both versions."""
    monkeypatch.setattr(raft.importlib.metadata, "version", lambda name: "0.3.18")
    with pytest.raises(ImportError, match=r"pysyncobj==0\.3\.17.*0\.3\.18"):
        raft._check_installed()


def test_a_missing_private_attribute_is_an_error_not_a_default():
    """Reading internals that are not there raises; it never reads as 'no quorum'."""

    class NotASyncObj:
        pass

    with pytest.raises(RuntimeError, match="lastResponseTime"):
        raft.last_response_times(NotASyncObj())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="noopIDx"):
        raft.noop_index(NotASyncObj())  # type: ignore[arg-type]


def test_the_installed_pysyncobj_passes_the_checks():
    """The pinned version and its private methods are what the project runs with."""
    raft._check_installed()
    assert raft.PINNED_VERSION == "0.3.17"

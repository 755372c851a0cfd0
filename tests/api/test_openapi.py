"""The OpenAPI document describes exactly the routes a member serves, with their roles."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from cache_plane.api.app import ACCESS_TABLE, create_app
from cache_plane.api.openapi import document, operations
from cache_plane.machine import CachePlaneMachine
from veristore_py import api as kv_api
from veristore_py.auth import PUBLIC
from veristore_py.config import NodeSettings
from veristore_py.errors import InvalidCommandError


def registered_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route the app registers, built without a node.

    aiohttp adds a HEAD route beside each GET (`allow_head`); it is the GET (auth treats it
    so, and the document says every GET answers HEAD), so it is left out.
    """
    stub = SimpleNamespace(store=SimpleNamespace(machine=CachePlaneMachine()))
    app = create_app(stub, NodeSettings())  # type: ignore[arg-type]
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None}
    return {(m, p) for m, p in routes if not (m == "HEAD" and ("GET", p) in routes)}


def test_the_access_table_lists_exactly_the_registered_routes():
    """Every served route has a role in ACCESS_TABLE, and the table names no other route."""
    assert set(ACCESS_TABLE) == registered_routes()


def test_the_document_has_exactly_the_registered_operations():
    """The spec's (method, path) set is the app's: nothing served goes undocumented."""
    assert operations(document()) == registered_routes()


def test_each_operation_declares_its_role_from_the_access_table():
    """security is the table's role as the bearer scope ([] if public), with 401 and,
    above the weakest role, 403 documented."""
    doc = document()
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for (method, path), role in ACCESS_TABLE.items():
        op = doc["paths"][path][method.lower()]
        responses = op["responses"]
        if role == PUBLIC:
            assert op["security"] == [] and "401" not in responses, (method, path)
        else:
            assert op["security"] == [{"bearer": [role]}], (method, path)
            assert "401" in responses and ("403" in responses) == (role != "read")
        assert responses["405"]["headers"]["Allow"]["required"] is True


def test_errors_are_documented_with_their_body_shape():
    """Every documented error answer is the {error, detail, definite} object."""
    doc = document()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "detail", "definite"]
    for item in doc["paths"].values():
        for method, op in item.items():
            if method == "parameters":
                continue
            for code, response in op["responses"].items():
                if int(code) >= 300:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}


def test_the_document_is_valid_openapi_31():
    """The spec passes an OpenAPI 3.1 validator (so generated clients can trust it)."""
    from openapi_spec_validator import validate

    validate(document())


@pytest.mark.parametrize("address", [
    "10.0.0.1:7000", "db-1.example.com:1", "[::1]:65535", "::1:80", "h:0", "h:65536",
    "h:080", "h:80\n", " h:80", "h:", ":80", "h:²", "h:8O", "hé:80", "h" * 300 + ":80"])
def test_the_address_schema_and_handler_agree(address):
    """A member address is valid for the schema exactly when the handler accepts it."""
    schema = document()["components"]["schemas"]["AddMember"]["properties"]["raft"]
    # ECMA-262 `$` is the end of input (Python's also matches before a final newline)
    by_schema = (len(address) <= schema["maxLength"]
                 and re.search(schema["pattern"].replace("$", r"\Z"), address) is not None)
    try:
        kv_api._address({"raft": address}, "raft")
        by_handler = True
    except InvalidCommandError:
        by_handler = False
    assert by_schema == by_handler

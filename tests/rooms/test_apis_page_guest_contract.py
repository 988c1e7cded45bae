"""The replies the chat page relies on for guests, asked of the real app in-process.

tests/browser/test_browser.py plays these replies to a browser (which can reach only loopback, the
owner), and neuromesh_static/app.js acts on them: keep the three in step. A guest here is a
WSGI call from another machine's address; nothing leaves the process.
"""

import pytest

import neuromesh
from conftest import ScriptedBackend, StubNode, scripted_router, wsgi_call

if "guests" not in {field.name for field in neuromesh.dataclasses.fields(neuromesh.Config)}:
    pytest.skip("this neuromesh.py has no --guests (the page's HTTP access for guests)", allow_module_level=True)

GUEST = "192.168.1.20"  # only ever an in-process REMOTE_ADDR, never a real connection


@pytest.fixture
def node(tmp_path):
    stub = StubNode(tmp_path, scripted_router(local=[ScriptedBackend("stub-llm")]), guests=True)
    yield stub
    stub.store.close()


@pytest.fixture
def app(node):
    return node.app()


def code_of(app):
    """The room code, as the owner's page reads it."""
    return wsgi_call(app, "GET", "/api/guests").json()["code"]


def test_a_stranger_gets_the_page_and_is_asked_for_the_room_code(app):
    for path in ("/", "/static/app.js", "/static/app.css", "/api/health"):
        assert wsgi_call(app, "GET", path, remote=GUEST).status == 200, path
    for method, path in (("GET", "/api/guests"), ("GET", "/api/conversations"), ("GET", "/api/models"),
                         ("GET", "/api/peers"), ("POST", "/api/conversations")):
        reply = wsgi_call(app, method, path, {} if method == "POST" else None, remote=GUEST)
        assert reply.status == 401, (path, reply.text)
        body = reply.json()
        assert body["guest_login"] is True and isinstance(body["error"], str) and body["error"], body


def test_the_room_code_signs_a_guest_in_with_a_strict_http_only_cookie(app):
    wrong = wsgi_call(app, "POST", "/api/guest/login", {"code": "NOT-IT"}, remote=GUEST)
    assert wrong.status == 403 and isinstance(wrong.json()["error"], str)
    right = wsgi_call(app, "POST", "/api/guest/login", {"code": " %s " % code_of(app).lower()}, remote=GUEST)
    assert right.status == 200, right.text
    assert right.json()["role"] == "guest"
    cookie = right.headers["Set-Cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower(), cookie
    session = {"Cookie": cookie.split(";")[0]}
    # Signed in: the app's calls answer; the owner's invitation does not (403: the page's sign of a guest).
    assert wsgi_call(app, "GET", "/api/conversations", headers=session, remote=GUEST).status == 200
    assert wsgi_call(app, "GET", "/api/guests", headers=session, remote=GUEST).status == 403


def test_the_owner_reads_the_invitation_and_signs_in_as_the_owner(app):
    reply = wsgi_call(app, "GET", "/api/guests")
    assert reply.status == 200
    invite = reply.json()
    assert invite["guests"] is True and isinstance(invite["urls"], list)
    assert isinstance(invite["code"], str) and len(invite["code"]) >= 6
    assert isinstance(invite["code_is_mesh_key"], bool)
    login = wsgi_call(app, "POST", "/api/guest/login", {"code": "anything"})
    assert login.status == 200 and login.json()["role"] == "owner"


def test_too_many_wrong_codes_answer_429_with_retry_after(app):
    for _ in range(30):
        reply = wsgi_call(app, "POST", "/api/guest/login", {"code": "GUESS"}, remote=GUEST)
        if reply.status == 429:
            break
        assert reply.status == 403, reply.text
    assert reply.status == 429, "no rate limit after 30 wrong codes"
    assert int(reply.headers["Retry-After"]) > 0
    assert isinstance(reply.json()["error"], str)

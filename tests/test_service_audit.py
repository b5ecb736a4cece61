"""The audit log: every mutating route and every model use leaves one event; admins read it; it is append-only."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

from hone.service.store import AppendOnlyError, AuditEvent
from test_service_api import (ROWS, add_model, auth, create_job, jsonl, project_id, route_table,  # noqa: F401
                              upload)
import test_service_api
from test_service_store import postgres_db, postgres_server  # noqa: F401  (fixtures)

svc = test_service_api.svc  # the same fixture (sqlite, and postgres when a server starts)


def events(svc, project="a", **params):
    r = svc.client.get("/v1/audit", headers=auth(svc.keys[project, "admin"]), params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_each_mutating_action_leaves_its_event(svc):
    c, admin, member = svc.client, auth(svc.keys["a", "admin"]), auth(svc.keys["a", "member"])
    key = c.post("/v1/keys", headers=admin, json={"role": "viewer"}).json()
    c.delete(f"/v1/keys/{key['id']}", headers=admin)
    fid = upload(svc, jsonl(ROWS)).json()["id"]
    job = create_job(svc, fid, headers={"X-Request-ID": "req-42"}).json()["id"]
    c.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=member)
    c.delete(f"/v1/files/{fid}", headers=member)
    add_model(svc, "a", "ft:tiny:x:abc")
    c.delete("/v1/models/ft:tiny:x:abc", headers=member)
    r = c.post("/v1/chat/completions", headers=member,
               json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    got = [(e["action"], e["object_type"], e["object_id"], e["outcome"]) for e in events(svc)]
    assert got == [("key.create", "api_key", key["id"], "success"), ("key.revoke", "api_key", key["id"], "success"),
                   ("file.create", "file", fid, "success"), ("job.create", "fine_tuning.job", job, "success"),
                   ("job.cancel", "fine_tuning.job", job, "success"), ("file.delete", "file", fid, "success"),
                   ("model.delete", "model", "ft:tiny:x:abc", "success"),
                   ("model.use", "model", "no-such-model", "not_found")]
    by_action = {e["action"]: e for e in events(svc)}
    assert by_action["job.create"]["request_id"] == "req-42"
    assert by_action["job.create"]["project_id"] == project_id(svc, "a") and by_action["job.create"]["role"] == "member"
    assert by_action["key.create"]["role"] == "admin" and by_action["key.create"]["key_id"]
    assert by_action["file.create"]["detail"]["filename"] == "train.jsonl" and by_action["file.create"]["ip"]
    assert events(svc, "b") == []  # another project's admin sees none of them


def test_filters_pagination_and_jsonl_export(svc):
    admin = auth(svc.keys["a", "admin"])
    fids = [upload(svc, jsonl(ROWS)).json()["id"] for _ in range(3)]
    create_job(svc, fids[0])
    assert [e["object_id"] for e in events(svc, action="file.create")] == fids
    assert [e["action"] for e in events(svc, object_id=fids[0])] == ["file.create"]
    assert events(svc, since=events(svc)[-1]["at"] + 1) == []
    page = svc.client.get("/v1/audit?limit=2", headers=admin).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    rest = svc.client.get(f"/v1/audit?limit=10&after={page['last_id']}", headers=admin).json()
    assert [e["id"] for e in page["data"] + rest["data"]] == [e["id"] for e in events(svc)] and not rest["has_more"]
    r = svc.client.get("/v1/audit/export", headers=admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonl")
    lines = r.text.splitlines()
    assert [json.loads(line) for line in lines] == events(svc) and len(lines) == 4
    only = svc.client.get("/v1/audit/export?action=job.create", headers=admin).text.splitlines()
    assert [json.loads(x)["action"] for x in only] == ["job.create"]


def test_audit_routes_are_admin_only(svc):
    table = {(path, method): role for path, method, role in route_table(svc.app)}
    assert table[("/v1/audit", "GET")] == "admin" and table[("/v1/audit/export", "GET")] == "admin"
    for url in ("/v1/audit", "/v1/audit/export"):
        for role in ("member", "viewer"):
            r = svc.client.get(url, headers=auth(svc.keys["a", role]))
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role", (url, role)
        assert svc.client.get(url).status_code == 401
    # No route may change or delete audit events.
    assert not [p for p, m, _ in route_table(svc.app) if p.startswith("/v1/audit") and m != "GET"]


def test_audit_events_are_append_only(svc):
    upload(svc, jsonl(ROWS))
    store = svc.app.state.store
    with pytest.raises(AppendOnlyError):
        with store.session() as s:
            s.scalars(select(AuditEvent)).first().outcome = "forged"
    with pytest.raises(AppendOnlyError):
        with store.session() as s:
            s.delete(s.scalars(select(AuditEvent)).first())
    if store.is_postgres:  # below the ORM too: the trigger refuses raw SQL
        for sql in ("UPDATE audit_events SET outcome = 'forged'", "DELETE FROM audit_events"):
            with pytest.raises(Exception, match="append-only"):
                with store.engine.begin() as conn:
                    conn.execute(text(sql))
    assert [e["outcome"] for e in events(svc)] == ["success"]

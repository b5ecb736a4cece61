"""The service API in-process (FastAPI TestClient, SQLite): auth on every route, files, jobs, models."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from hone.service.app import create_app
from hone.service.auth import create_key, hash_key
from hone.service.models_routes import register_base
from hone.service.settings import Settings
from hone.service.store import ApiKey
from test_service_store import postgres_db, postgres_server  # noqa: F401  (fixtures)

ROWS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(6)]
PAIRS = [{"input": {"messages": [{"role": "user", "content": f"q{i}"}]},
          "preferred_output": [{"role": "assistant", "content": f"good {i}"}],
          "non_preferred_output": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(4)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(params=["sqlite", "postgres"])
def svc(request, tmp_path):
    db_url = None
    if request.param == "postgres":  # the same API on a real PostgreSQL server (skipped when none starts)
        db_url = request.getfixturevalue("postgres_db")
    settings = Settings(data_dir=tmp_path / "data", max_upload_bytes=20_000, max_request_bytes=50_000,
                        db_url=db_url)
    (tmp_path / "tiny").mkdir()  # jobs are only created here, never trained: any directory will do
    app = create_app(settings)
    keys = {}
    with app.state.store.session() as s:
        register_base(s, "tiny", str(tmp_path / "tiny"))
        for project in ("a", "b"):
            for role in ("admin", "member", "viewer"):
                keys[project, role] = create_key(s, project, role)[1]
    client = TestClient(app)
    yield SimpleNamespace(app=app, client=client, keys=keys, settings=settings)
    client.close()
    app.state.store.dispose()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(svc, content: bytes, name="train.jsonl", key=("a", "member"), purpose="fine-tune"):
    return svc.client.post("/v1/files", headers=auth(svc.keys[key]),
                           files={"file": (name, content, "application/jsonl")}, data={"purpose": purpose})


def create_job(svc, file_id, key=("a", "member"), headers=None, **body):
    return svc.client.post("/v1/fine_tuning/jobs", headers={**auth(svc.keys[key]), **(headers or {})},
                           json={"model": "tiny", "training_file": file_id, **body})


# --- every route: no key -> 401, another project's object -> 404, too low a role -> 403 ------------------


def route_table(app):
    """(path, method, minimum role) for every route, included routers too (FastAPI includes them lazily)."""
    out = []
    for r in app.routes:
        contexts = r.effective_route_contexts() if hasattr(r, "effective_route_contexts") else [r]
        for c in contexts:
            for method in sorted(getattr(c, "methods", None) or getattr(c.original_route, "methods", ())):
                out.append((c.path, method, min_role(c.dependant)))
    return out


def min_role(dependant) -> str | None:
    roles = []

    def walk(d):
        for sub in d.dependencies:
            if hasattr(sub.call, "role"):
                roles.append(sub.call.role)
            walk(sub)
    walk(dependant)
    order = ("viewer", "member", "admin")
    return max(roles, key=order.index) if roles else None


def add_model(svc, project: str, model_id: str, adapter="q"):
    from hone.service.store import Model

    with svc.app.state.store.session() as s:
        s.add(Model(id=model_id, project_id=project_id(svc, project), kind="fine-tuned", base="tiny",
                    base_path="p", adapter_path=adapter))


def project_id(svc, name):
    from sqlalchemy import select

    with svc.app.state.store.session() as s:
        return s.scalar(select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(svc.keys[name, "viewer"])))


def test_every_route_refuses_missing_key_wrong_project_and_low_role(svc):
    c = svc.client
    file_id = upload(svc, jsonl(ROWS)).json()["id"]
    job = create_job(svc, file_id).json()
    key_id = c.get("/v1/keys", headers=auth(svc.keys["a", "admin"])).json()["data"][0]["id"]
    add_model(svc, "a", "ft:tiny:x:abc")
    ids = {"file_id": file_id, "job_id": job["id"], "key_id": key_id, "model_id": "ft:tiny:x:abc"}
    table = route_table(svc.app)
    paths = {p for p, _, _ in table}
    assert {"/v1/files", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/models",
            "/v1/keys/{key_id}", "/v1/models/{model_id}"} <= paths
    assert not {"/docs", "/openapi.json", "/redoc"} & paths  # they would be open
    for path, method, role in table:
        assert role is not None, f"{method} {path} has no auth dependency"
        url = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: ids[m.group(1)], path)
        body = {"json": {}} if method == "POST" else {}
        r = c.request(method, url, **body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", (method, path)
        r = c.request(method, url, headers={"Authorization": "Bearer hone-not-a-key"}, **body)
        assert r.status_code == 401, (method, path)
        if "{" in path:  # an object of project a, asked for with project b's most powerful key
            r = c.request(method, url, headers=auth(svc.keys["b", "admin"]), **body)
            assert r.status_code == 404, (method, path, r.text)
            if method == "GET":  # ... while project a's own key finds it
                assert c.get(url, headers=auth(svc.keys["a", "viewer"])).status_code == 200, path
        lower = {"admin": "member", "member": "viewer"}.get(role)
        if lower:
            r = c.request(method, url, headers=auth(svc.keys["a", lower]), **body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role", (method, path)
    # List routes do not 404; they must not show another project's objects.
    for url in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/keys"):
        data = c.get(url, headers=auth(svc.keys["b", "admin"])).json()["data"]
        assert all(x["id"] not in ids.values() for x in data), url
    assert [m["id"] for m in c.get("/v1/models", headers=auth(svc.keys["b", "viewer"])).json()["data"]] == \
        ["smollm2-135m-instruct", "tiny"]
    # Viewer routes have no lower role to refuse; every route that changes something needs member or admin.
    assert all(role != "viewer" for _, method, role in table if method in ("POST", "DELETE"))


def test_keys_are_hashed_shown_once_and_revocable(svc):
    c, admin = svc.client, auth(svc.keys["a", "admin"])
    made = c.post("/v1/keys", headers=admin, json={"role": "viewer", "name": "ci"}).json()
    assert made["key"].startswith("hone-") and len(made["key"]) > 40
    with svc.app.state.store.session() as s:
        row = s.get(ApiKey, made["id"])
        assert row.key_hash == hash_key(made["key"]) and made["key"] not in (row.key_hash, row.prefix)
    listed = c.get("/v1/keys", headers=admin).json()["data"]
    assert all("key" not in k for k in listed)
    assert c.get("/v1/files", headers=auth(made["key"])).status_code == 200
    assert c.delete(f"/v1/keys/{made['id']}", headers=admin).status_code == 200
    assert c.get("/v1/files", headers=auth(made["key"])).status_code == 401


# --- files -----------------------------------------------------------------------------------------------


def test_file_upload_list_retrieve_content_delete(svc):
    c, h = svc.client, auth(svc.keys["a", "viewer"])
    content = jsonl(ROWS)
    f = upload(svc, content, name="../../etc/passwd.jsonl").json()
    assert f["object"] == "file" and f["bytes"] == len(content) and f["purpose"] == "fine-tune"
    assert f["filename"] == "passwd.jsonl"
    stored = list((svc.settings.data_dir / "files").iterdir())
    assert [p.name for p in stored] == [f"{f['id']}.jsonl"]  # by generated id, never the user's name
    assert c.get(f"/v1/files/{f['id']}", headers=h).json() == f
    assert c.get(f"/v1/files/{f['id']}/content", headers=h).content == content
    assert [x["id"] for x in c.get("/v1/files", headers=h).json()["data"]] == [f["id"]]
    assert c.delete(f"/v1/files/{f['id']}", headers=auth(svc.keys["a", "member"])).json()["deleted"] is True
    assert c.get(f"/v1/files/{f['id']}", headers=h).status_code == 404
    assert not list((svc.settings.data_dir / "files").iterdir())


def test_bad_file_is_refused_naming_each_line(svc):
    bad = jsonl(ROWS[:2]) + b"{not json\n" + jsonl([{"messages": [{"role": "user", "content": "hi"}]}])
    r = upload(svc, bad, name="mine.jsonl")
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_file" and err["param"] == "file"
    assert "line 3: [invalid_json]" in err["message"] and "line 4: [no_assistant_turn]" in err["message"]
    assert "mine.jsonl" in err["message"] and str(svc.settings.data_dir) not in err["message"]
    bad_pair = jsonl(PAIRS[:1] + [{"input": {"messages": [{"role": "user", "content": "x"}]},
                                   "preferred_output": [{"role": "assistant", "content": "same"}],
                                   "non_preferred_output": [{"role": "assistant", "content": "same"}]}])
    err = upload(svc, bad_pair).json()["error"]
    assert "line 2: [identical_answers]" in err["message"]
    assert not list((svc.settings.data_dir / "files").iterdir())


def test_upload_limits_and_purpose(svc):
    r = upload(svc, jsonl(ROWS * 200))
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert upload(svc, jsonl(ROWS), purpose="batch").json()["error"]["param"] == "purpose"
    assert upload(svc, b"x", name="evil.sh").json()["error"]["code"] == "invalid_file"
    r = svc.client.post("/v1/fine_tuning/jobs", headers=auth(svc.keys["a", "member"]),
                        json={"model": "tiny", "training_file": "x", "suffix": "s" * 60_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --- jobs ------------------------------------------------------------------------------------------------


def test_job_create_maps_onto_hone_config_and_lists_events(svc):
    fid = upload(svc, jsonl(ROWS)).json()["id"]
    r = create_job(svc, fid, suffix="support", seed=7,
                   method={"type": "supervised", "supervised": {"hyperparameters": {
                       "n_epochs": 3, "learning_rate_multiplier": 2, "batch_size": 4}}})
    job = r.json()
    assert r.status_code == 200 and job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
    from hone.service.store import Job

    with svc.app.state.store.session() as s:
        cfg = s.get(Job, job["id"]).config
    assert cfg["method"] == "lora" and cfg["train"] == {"seed": 7, "epochs": 3, "learning_rate": 4e-4,
                                                        "batch_tokens": 1024}
    events = svc.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth(svc.keys["a", "viewer"]))
    assert [e["message"] for e in events.json()["data"]] == [
        "Files validated, moving job to queued state", f"Validating training file: {fid}"]


def test_job_errors_and_failed_state(svc):
    sft = upload(svc, jsonl(ROWS)).json()["id"]
    r = create_job(svc, sft, model="gpt-4o")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = create_job(svc, "file-nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    r = create_job(svc, sft, hyperparameters={"n_epochs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters"
    # DPO on supervised rows: the job exists and fails in validating_files with an error naming the file.
    job = create_job(svc, sft, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}).json()
    assert job["status"] == "failed" and job["error"]["param"] == "training_file"
    assert job["error"]["code"] == "invalid_training_file" and "preference pairs" in job["error"]["message"]
    pairs = upload(svc, jsonl(PAIRS)).json()["id"]
    job = create_job(svc, pairs, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}).json()
    assert job["status"] == "queued" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2


def test_idempotency_key(svc):
    fid = upload(svc, jsonl(ROWS)).json()["id"]
    first = create_job(svc, fid, headers={"Idempotency-Key": "k1"}, seed=1).json()
    again = create_job(svc, fid, headers={"Idempotency-Key": "k1"}, seed=1).json()
    assert again["id"] == first["id"]
    r = create_job(svc, fid, headers={"Idempotency-Key": "k1"}, seed=2)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per project: project b's k1 is a different job (on its own file).
    fb = upload(svc, jsonl(ROWS), key=("b", "member")).json()["id"]
    other = create_job(svc, fb, key=("b", "member"), headers={"Idempotency-Key": "k1"}, seed=1).json()
    assert other["id"] != first["id"]
    jobs = svc.client.get("/v1/fine_tuning/jobs", headers=auth(svc.keys["a", "viewer"])).json()["data"]
    assert len(jobs) == 1


def test_concurrent_retries_with_one_idempotency_key_make_one_job(svc):
    from concurrent.futures import ThreadPoolExecutor

    fid = upload(svc, jsonl(ROWS)).json()["id"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: create_job(svc, fid, headers={"Idempotency-Key": "retry"}), range(6)))
    assert all(r.status_code == 200 for r in answers)
    assert len({r.json()["id"] for r in answers}) == 1


def test_list_pagination_and_cancel(svc):
    fid = upload(svc, jsonl(ROWS)).json()["id"]
    made = [create_job(svc, fid, seed=i).json()["id"] for i in range(5)]
    h = auth(svc.keys["a", "viewer"])
    page = svc.client.get("/v1/fine_tuning/jobs?limit=2", headers=h).json()
    assert [j["id"] for j in page["data"]] == made[::-1][:2] and page["has_more"] is True
    rest = svc.client.get(f"/v1/fine_tuning/jobs?limit=10&after={made[3]}", headers=h).json()
    assert [j["id"] for j in rest["data"]] == made[::-1][2:] and rest["has_more"] is False
    m = auth(svc.keys["a", "member"])
    cancelled = svc.client.post(f"/v1/fine_tuning/jobs/{made[0]}/cancel", headers=m).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    r = svc.client.post(f"/v1/fine_tuning/jobs/{made[0]}/cancel", headers=m)
    assert r.status_code == 409  # terminal states never change


def test_models_list_retrieve_delete(svc):
    add_model(svc, "a", "ft:tiny:x:abc")
    c, va, vb = svc.client, auth(svc.keys["a", "viewer"]), auth(svc.keys["b", "viewer"])
    assert "ft:tiny:x:abc" in [m["id"] for m in c.get("/v1/models", headers=va).json()["data"]]
    assert c.get("/v1/models/ft:tiny:x:abc", headers=va).json()["object"] == "model"
    assert c.get("/v1/models/ft:tiny:x:abc", headers=vb).status_code == 404
    resolved = svc.app.state.model_resolver(project_id(svc, "a"), "ft:tiny:x:abc")
    assert resolved.base == "tiny" and resolved.base_path.endswith("tiny") and resolved.adapter_path == "q"
    with pytest.raises(Exception, match="No model"):
        svc.app.state.model_resolver(project_id(svc, "b"), "ft:tiny:x:abc")
    assert c.delete("/v1/models/tiny", headers=auth(svc.keys["a", "member"])).status_code == 403
    assert c.delete("/v1/models/ft:tiny:x:abc", headers=auth(svc.keys["a", "member"])).json()["deleted"]
    assert c.get("/v1/models/ft:tiny:x:abc", headers=va).status_code == 404

"""Encryption at rest: sealed blobs on disk, round trip, tamper detection, key rotation, a wrong key."""

from __future__ import annotations

import base64
import json
import secrets
import stat

import pytest
from typer.testing import CliRunner

from hone.cli import app as cli_app
from hone.service.settings import Settings
from hone.service.storage import CHUNK, MAGIC, FileStore, Keyring, KeyUnavailable, StoredFileCorrupt, rotate
from test_service_api import ROWS, auth, jsonl, upload
import test_service_api
from test_service_store import postgres_db, postgres_server  # noqa: F401  (fixtures)

svc = test_service_api.svc  # the same fixture (sqlite, and postgres when a server starts)


def plain_file(tmp_path, data: bytes, name="src.jsonl"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.fixture
def fstore(tmp_path):
    return FileStore(tmp_path / "files", Keyring.from_file(tmp_path / "keys.json"))


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_upload_is_sealed_on_disk_and_reads_back(svc):
    content = jsonl(ROWS)
    fid = upload(svc, content).json()["id"]
    blob = svc.settings.data_dir / "files" / f"{fid}.jsonl"
    raw = blob.read_bytes()
    assert raw.startswith(MAGIC) and b"question" not in raw and content not in raw
    assert len(raw) > len(content)  # header, nonce and tag
    keys = svc.settings.data_dir / "encryption-keys.json"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    r = svc.client.get(f"/v1/files/{fid}/content", headers=auth(svc.keys["a", "viewer"]))
    assert r.status_code == 200 and r.content == content
    assert not list((svc.settings.data_dir / "tmp").iterdir())  # the plain temp upload is gone


def test_round_trip_across_chunks_and_empty(fstore, tmp_path):
    for size in (0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7):
        data = secrets.token_bytes(size)
        fstore.put_file("blob.bin", plain_file(tmp_path, data))
        with fstore.open("blob.bin") as f:
            assert f.read() == data, size
        assert fstore.copy_to("blob.bin", tmp_path / "out.bin").read_bytes() == data
    # The same plaintext twice seals to different bytes (a fresh nonce per chunk).
    fstore.put_file("a.bin", plain_file(tmp_path, b"same"))
    fstore.put_file("b.bin", plain_file(tmp_path, b"same"))
    assert (fstore.root / "a.bin").read_bytes() != (fstore.root / "b.bin").read_bytes()


@pytest.mark.parametrize("where", ["header", "first", "middle", "last", "truncate", "append"])
def test_any_change_is_detected_and_nothing_is_returned(fstore, tmp_path, where):
    data = secrets.token_bytes(2 * CHUNK + 100)
    fstore.put_file("blob.bin", plain_file(tmp_path, data))
    blob = fstore.root / "blob.bin"
    size = blob.stat().st_size
    if where == "truncate":
        blob.write_bytes(blob.read_bytes()[:-50])
    elif where == "append":
        blob.write_bytes(blob.read_bytes() + b"\0")
    else:
        flip(blob, {"header": len(MAGIC) + 3, "first": 40, "middle": size // 2, "last": size - 1}[where])
    with pytest.raises((StoredFileCorrupt, KeyUnavailable)):
        fstore.open("blob.bin")
    with pytest.raises((StoredFileCorrupt, KeyUnavailable)):
        fstore.copy_to("blob.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()  # a partial plain copy is removed


def test_tampered_upload_is_a_500_with_a_clear_message_and_an_audit_event(svc):
    fid = upload(svc, jsonl(ROWS)).json()["id"]
    flip(svc.settings.data_dir / "files" / f"{fid}.jsonl", 60)
    r = svc.client.get(f"/v1/files/{fid}/content", headers=auth(svc.keys["a", "viewer"]))
    assert r.status_code == 500 and b"question" not in r.content
    err = r.json()["error"]
    assert err["code"] == "integrity_check_failed" and "failed its integrity check" in err["message"]
    assert fid in err["message"]
    events = svc.client.get("/v1/audit?action=file.read", headers=auth(svc.keys["a", "admin"])).json()["data"]
    assert [(e["object_id"], e["outcome"]) for e in events] == [(fid, "integrity_error")]


def test_rotation_reseals_everything_and_keeps_old_keys_readable_until_done(fstore, tmp_path):
    data = {f"f{i}.jsonl": secrets.token_bytes(1000 + i) for i in range(3)}
    for key, value in data.items():
        fstore.put_file(key, plain_file(tmp_path, value))
    old_id = fstore.keys.current
    other_process = FileStore(fstore.root, Keyring.from_file(tmp_path / "keys.json"))  # loaded before rotation
    counts = rotate(fstore)
    assert counts["resealed"] == 3 and counts["old_key_ids"] == [old_id] and counts["new_key_id"] != old_id
    assert {fstore.blob_key_id(k) for k in data} == {counts["new_key_id"]}
    doc = json.loads((tmp_path / "keys.json").read_text())
    assert doc["current"] == counts["new_key_id"] and len(doc["keys"]) == 1  # old key dropped when done
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    for key, value in data.items():
        assert fstore.open(key).read() == value
        assert other_process.open(key).read() == value  # it picks the new key up from the key file
    assert rotate(fstore)["resealed"] == 3


def test_wrong_key_fails_clearly(tmp_path, monkeypatch):
    right = FileStore(tmp_path / "files", Keyring([secrets.token_bytes(32)]))
    right.put_file("f.jsonl", plain_file(tmp_path, b"secret rows"))
    wrong = FileStore(tmp_path / "files", Keyring([secrets.token_bytes(32)]))
    with pytest.raises(KeyUnavailable, match="not in \\$HONE_ENCRYPTION_KEY: wrong or missing encryption key"):
        wrong.open("f.jsonl")
    # From the environment: the first key seals, later ones still open (rotation with env keys).
    new, old = secrets.token_bytes(32), right.keys.keys[right.keys.current]
    env = ",".join(base64.urlsafe_b64encode(k).decode() for k in (new, old))
    monkeypatch.setenv("HONE_ENCRYPTION_KEY", env)
    store = FileStore.from_settings(Settings(data_dir=tmp_path))
    assert store.open("f.jsonl").read() == b"secret rows"
    assert rotate(store)["resealed"] == 1
    monkeypatch.setenv("HONE_ENCRYPTION_KEY", base64.urlsafe_b64encode(new).decode())
    assert FileStore.from_settings(Settings(data_dir=tmp_path)).open("f.jsonl").read() == b"secret rows"
    monkeypatch.setenv("HONE_ENCRYPTION_KEY", "too-short")
    with pytest.raises(ValueError, match="32 bytes"):
        FileStore.from_settings(Settings(data_dir=tmp_path))


def test_rotate_key_command(tmp_path):
    data = tmp_path / "data"
    store = FileStore.from_settings(Settings(data_dir=data))
    store.put_file("f.jsonl", plain_file(tmp_path, b"rows"))
    (data / "files" / "legacy.jsonl").write_bytes(b"old plain rows")
    r = CliRunner().invoke(cli_app, ["api", "rotate-key", "--data-dir", str(data)])
    assert r.exit_code == 0 and "re-encrypted 1 file(s)" in r.output and "1 unencrypted left" in r.output, r.output
    r = CliRunner().invoke(cli_app, ["api", "rotate-key", "--data-dir", str(data), "--encrypt-plaintext"])
    assert r.exit_code == 0 and "re-encrypted 2 file(s)" in r.output, r.output
    store = FileStore.from_settings(Settings(data_dir=data))
    assert store.open("legacy.jsonl").read() == b"old plain rows" and store.open("f.jsonl").read() == b"rows"
    flip(data / "files" / "f.jsonl", 50)
    r = CliRunner().invoke(cli_app, ["api", "rotate-key", "--data-dir", str(data)])
    assert r.exit_code == 2 and "failed its integrity check" in r.output, r.output

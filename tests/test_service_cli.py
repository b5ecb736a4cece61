"""`hone api create-key`, `hone api add-base` and `hone api` itself (a real server process on a free port)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from typer.testing import CliRunner

from hone.cli import app

runner = CliRunner()


def test_create_key_prints_the_key_once_and_stores_its_hash(tmp_path):
    data = tmp_path / "data"
    r = runner.invoke(app, ["api", "create-key", "--project", "acme", "--role", "admin", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1]
    assert key.startswith("hone-")
    for db_file in data.glob("hone.db*"):  # the database and its WAL
        assert key.encode() not in db_file.read_bytes()
    bad = runner.invoke(app, ["api", "create-key", "--project", "acme", "--role", "owner", "--data-dir", str(data)])
    assert bad.exit_code == 2 and "viewer, member, admin" in bad.output


def test_add_base_checks_the_path(tmp_path, tiny_model_dir):
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(app, ["api", "add-base", "tiny", str(tiny_model_dir), *data]).exit_code == 0
    r = runner.invoke(app, ["api", "add-base", "nope", str(tmp_path / "missing"), *data])
    assert r.exit_code == 2 and "no such directory" in r.output
    r = runner.invoke(app, ["api", "add-base", "ft:x", str(tiny_model_dir), *data])
    assert r.exit_code == 2 and "no ':'" in r.output


def test_hone_api_serves_with_no_setup(tmp_path):
    data = tmp_path / "data"
    key = runner.invoke(app, ["api", "create-key", "--project", "p", "--role", "viewer", "--data-dir",
                              str(data)]).output.strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hone", "api", "--port", str(port), "--data-dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        body = None
        end = time.monotonic() + 120
        while body is None:
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read().decode()[-2000:]
            try:
                req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert "smollm2-135m-instruct" in [m["id"] for m in body["data"]]
        try:
            urllib.request.urlopen(url, timeout=5)
            raise AssertionError("a request without a key was served")
        except urllib.error.HTTPError as e:
            assert e.code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""hone data synth: the grounding filter, parsing messy teacher output, the endpoint client against a local
HTTP server, and the whole stage with a local model (tiny random; the real embedded one under -m slow)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hone.data.stage import Reject, rejects_path, report_path
from hone.data.synth import (
    EndpointTeacher,
    SynthOptions,
    TeacherError,
    check_pair,
    content_words,
    parse_pairs,
    stem,
    support,
    synth,
    teacher_prompt,
)
from hone.records import Message

GUIDE = Path(__file__).parent / "fixtures" / "data" / "synth" / "backup_guide.md"
CHUNK = ("Backups are kept for 90 days on the Standard plan and for one year on the Business plan. "
         "Deleted files stay in the backup for 30 days.")


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- grounding filter --------------------------------------------------------------------------------------

def test_content_words_drop_stop_words_and_stem():
    assert content_words("The invoices were charged to the cards.") == {"invoic", "charg", "card"}
    assert stem("invoice") == stem("invoices") and stem("charged") == stem("charge") == stem("charging")
    assert stem("policies") == stem("policy")
    assert support("kept for 90 days", content_words(CHUNK)) == 1.0
    assert support("kept for 90 weeks", content_words(CHUNK)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("question, answer, code", [
    ("How long are backups kept on Standard?", "For 90 days on the Standard plan.", None),
    ("How long do deleted files stay?", "Deleted files stay for 30 days.", None),
    ("How long are backups kept?", "Forever, on tape, in a Swiss bunker.", "unsupported_answer"),
    ("How long are backups kept?", "For 90 days, then moved to cold storage in Iceland.", "unsupported_answer"),
    ("How long are backups kept?", "", "empty"),
    ("How long are backups kept?", "It is.", "empty"),  # no content words at all
    ("", "For 90 days.", "empty"),
    ("How long are backups kept?", "How long are backups kept?", "answer_is_question"),
    ("How long are backups kept?", "Backups kept long.", "answer_is_question"),
    ("What about the Business plan?", "How long is the Business plan?", "answer_is_question"),
])
def test_check_pair_cases(question, answer, code):
    result = check_pair(question, answer, content_words(CHUNK), 0.7, set())
    if code is None:
        assert isinstance(result, float) and result >= 0.7
    else:
        assert isinstance(result, Reject) and result.code == code, result


def test_check_pair_threshold_and_duplicates():
    seen: set[str] = set()
    words = content_words(CHUNK)
    # 2 of 3 content words supported: kept at 0.6, refused at 0.7
    assert isinstance(check_pair("How long?", "kept 90 weeks", words, 0.7, set()), Reject)
    assert check_pair("How long?", "kept 90 weeks", words, 0.6, seen) == pytest.approx(2 / 3)
    dup = check_pair("how LONG ?", "kept 90 days", words, 0.6, seen)
    assert isinstance(dup, Reject) and dup.code == "duplicate_question"


# --- parsing teacher output --------------------------------------------------------------------------------

@pytest.mark.parametrize("output, expected", [
    ("Q: When?\nA: At 2 a.m.\nQ: Where?\nA: On Acme's servers.", [("When?", "At 2 a.m."), ("Where?", "On Acme's servers.")]),
    ("Sure! Here are the questions:\n\n1. **Q:** When?\n   **A:** At 2 a.m.\n\n2. **Q:** Why?\n   **A:** Speed.",
     [("When?", "At 2 a.m."), ("Why?", "Speed.")]),
    ("Question 1: When?\nAnswer 1: At 2 a.m.\nIt is automatic.\nQuestion 2: Cost?\nAnswer 2: 6 euros",
     [("When?", "At 2 a.m.\nIt is automatic."), ("Cost?", "6 euros")]),
    ('```json\n[{"question": "When?", "answer": "At 2 a.m."}, {"q": "Cost?", "a": "6 euros"}]\n```',
     [("When?", "At 2 a.m."), ("Cost?", "6 euros")]),
    ('{"pairs": [{"Question": "When?", "Answer": "At 2 a.m."}]}', [("When?", "At 2 a.m.")]),
    ('{"question": "When?", "answer": "At 2 a.m."}\n{"question": "Cost?", "answer": "6 euros"}\nnoise',
     [("When?", "At 2 a.m."), ("Cost?", "6 euros")]),
    ("- Q: When does it run\n  every night?\n- A: At 2 a.m.", [("When does it run every night?", "At 2 a.m.")]),
    ("Q: A question with no answer\nQ: When?\nA: At 2 a.m.", [("When?", "At 2 a.m.")]),
    ("Q: When?\nA: At 2 a.m.\nQ", [("When?", "At 2 a.m.")]),  # cut off by the token budget
    ("Q: When?\nA: At 2 a.m.\nQ: Why?\nA", [("When?", "At 2 a.m."), ("Why?", "")]),
    ("I cannot help with that.", []),
    ("A: an answer first\nrandom text", []),
    ("", []),
])
def test_parse_pairs_messy_outputs(output, expected):
    assert parse_pairs(output) == expected


def test_teacher_prompt_holds_chunk_and_count():
    messages = teacher_prompt("THE CHUNK", 4)
    assert messages[-1].role == "user" and "THE CHUNK" in messages[-1].content and "4 questions" in messages[-1].content
    assert parse_pairs(messages[2].content)  # the worked example is in the format we parse


# --- endpoint client against a real local HTTP server --------------------------------------------------------

class _Server:
    """A tiny OpenAI-compatible stand-in for the *remote* service: replies are scripted per request."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, payload, headers = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(content):
    return 200, {"id": "c1", "object": "chat.completion", "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}]}, {}


@pytest.fixture
def server():
    servers = []

    def start(*replies):
        servers.append(_Server(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _opts(url, **kw):
    return SynthOptions(teacher_url=url, api_key="sk-test", teacher_model="m", retry_wait_s=0.01, **kw)


def test_endpoint_sends_openai_request(server):
    s = server(_completion("Q: a?\nA: b"))
    teacher = EndpointTeacher(_opts(s.url, max_new_tokens=99))
    assert teacher([[Message("user", "hello")]]) == ["Q: a?\nA: b"]
    [req] = s.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "m" and req["body"]["max_tokens"] == 99
    assert req["body"]["messages"] == [{"role": "user", "content": "hello"}]


def test_endpoint_retries_429_and_5xx_then_succeeds(server):
    s = server((429, {"error": "slow down"}, {"Retry-After": "0"}), (503, {"error": "busy"}, {}), _completion("ok"))
    waits = []
    teacher = EndpointTeacher(_opts(s.url), sleep=waits.append)
    assert teacher.complete([Message("user", "x")]) == "ok"
    assert len(s.requests) == 3 and waits == [0.0, 0.02]  # Retry-After honoured, then doubling backoff


def test_endpoint_gives_up_after_retries(server):
    s = server((500, {"error": "down"}, {}))
    with pytest.raises(TeacherError, match="HTTP 500 after 3 tries"):
        EndpointTeacher(_opts(s.url, retries=2), sleep=lambda _: None).complete([Message("user", "x")])
    assert len(s.requests) == 3


@pytest.mark.parametrize("status, match", [(401, "refused the API key"), (404, "usually ends in /v1"),
                                           (400, "HTTP 400")])
def test_endpoint_clear_errors(server, status, match):
    s = server((status, {"error": {"message": "nope"}}, {}))
    with pytest.raises(TeacherError, match=match):
        EndpointTeacher(_opts(s.url)).complete([Message("user", "x")])
    assert len(s.requests) == 1  # client errors are not retried


def test_endpoint_unreachable_and_bad_reply(server):
    with pytest.raises(TeacherError, match="cannot reach"):
        EndpointTeacher(_opts("http://127.0.0.1:9", retries=1), sleep=lambda _: None).complete([Message("user", "x")])
    s = server((200, {"unexpected": True}, {}))
    with pytest.raises(TeacherError, match="not an OpenAI chat.completion"):
        EndpointTeacher(_opts(s.url)).complete([Message("user", "x")])


def test_synth_stage_with_endpoint_teacher(server, tmp_path):
    s = server(_completion("1. Q: When does the backup run?\n   A: Every night at 2 a.m.\n"
                           "2. Q: What colour is the sky?\n   A: Purple with green dots.\n"
                           "3. Q: When does the backup run?\n   A: At 2 a.m. every night."),
               _completion("I am not able to write questions."))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": GUIDE.read_text()[:500], "meta": {"title": "guide"}}) + "\n"
                    + json.dumps({"text": "The backup runs every night at 2 a.m. on plugged-in laptops."}) + "\n"
                    + json.dumps({"label": "no text"}) + "\n" + "{broken\n")
    out = tmp_path / "qa.jsonl"
    # One request at a time: the test server answers in arrival order, so concurrency would shuffle answers.
    report = synth([docs], out, _opts(s.url, chunk_chars=600, batch_size=1))
    # doc 1: 3 candidates (1 kept, 1 unsupported, 1 duplicate); doc 2: unparseable; then 2 bad inputs
    assert report.rejected == {"unsupported_answer": 1, "duplicate_question": 1, "unparseable_output": 1,
                               "not_a_document": 1, "invalid_json": 1}
    assert (report.records_in, report.passed) == (6, 1) and report.records_in == report.passed + report.rejected_total
    [kept] = _rows(out)
    assert kept["messages"] == [{"role": "user", "content": "When does the backup run?"},
                                {"role": "assistant", "content": "Every night at 2 a.m."}]
    assert kept["provenance"] == {"source": str(docs), "line": 1, "chunk": 0}
    assert kept["meta"]["title"] == "guide" and kept["meta"]["chunk_start"] == 0
    assert kept["meta"]["chunk_text"] in GUIDE.read_text() and kept["meta"]["support"] == 1.0
    rejects = {r["code"]: r for r in _rows(rejects_path(out))}
    assert "purpl" in rejects["unsupported_answer"]["message"]
    assert rejects["unsupported_answer"]["record"]["messages"][1]["content"] == "Purple with green dots."
    assert rejects["not_a_document"]["line"] == 3 and rejects["invalid_json"]["line"] == 4
    assert "not able to write" in rejects["unparseable_output"]["raw"]
    saved = json.loads(report_path(out).read_text())
    assert saved["details"]["pairs_generated"] == 3 and saved["details"]["acceptance_rate"] == 0.333
    assert saved["details"]["documents"] == 4 and saved["details"]["chunks"] == 2
    assert "sk-test" not in report_path(out).read_text()  # the key never reaches the report
    assert "2 a.m." in s.requests[0]["body"]["messages"][-1]["content"]


def test_synth_max_chunks_and_cli_401(server, tmp_path):
    s = server(_completion("Q: When?\nA: Every night at 2 a.m.\nQ: Again?\nA: Yes.\nQ: And?\nA: No."))
    out = tmp_path / "qa.jsonl"
    report = synth([GUIDE], out, _opts(s.url, chunk_chars=300, max_chunks=2, pairs_per_chunk=1))
    assert report.details["chunks"] == 2 and report.details["stopped_at_max_chunks"] is True
    assert len(s.requests) == 2 and s.requests[0]["body"]["max_tokens"] == 64
    # only the pair asked for per chunk is judged; the surplus is counted, not silently lost
    assert report.details["pairs_generated"] == 2 and report.details["pairs_beyond_requested"] == 4
    assert report.passed == 1 and report.rejected_total == 1  # chunk 1 does not mention 2 a.m.

    from hone.cli import app

    refusing = server((401, {"error": "bad key"}, {}))
    result = CliRunner().invoke(app, ["data", "synth", str(GUIDE), "--out", str(out), "--teacher-url",
                                      refusing.url, "--api-key", "wrong", "--teacher-model", "m"])
    assert result.exit_code == 2 and "refused the API key" in result.output
    result = CliRunner().invoke(app, ["data", "synth", str(GUIDE), "--out", str(out), "--teacher-url", refusing.url])
    assert result.exit_code == 2 and "--teacher-model" in result.output


# --- local model ---------------------------------------------------------------------------------------------

def test_synth_with_tiny_local_model(tiny_model_dir, tmp_path, one_torch_thread):
    out = tmp_path / "qa.jsonl"
    report = synth([GUIDE], out, SynthOptions(teacher=str(tiny_model_dir), chunk_chars=700, max_new_tokens=24,
                                              max_chunks=3))
    d = report.details
    assert d["chunks"] == 3 and d["documents"] == 1 and d["teacher"] == str(tiny_model_dir)
    # random weights: expect mostly unparseable output; whatever comes out, every candidate is accounted for
    assert report.records_in == report.passed + report.rejected_total
    assert report.records_in == d["unparseable_chunks"] + d["pairs_generated"]
    rejects = _rows(rejects_path(out))
    assert len(rejects) == report.rejected_total
    assert all(r["source"] == str(GUIDE) for r in rejects)
    for row in _rows(out):
        assert row["provenance"]["source"] == str(GUIDE) and "chunk" in row["provenance"]


@pytest.mark.slow
def test_synth_with_embedded_model(tmp_path):
    out = tmp_path / "qa.jsonl"
    report = synth([GUIDE], out, SynthOptions(max_chunks=1, chunk_chars=600))
    assert report.details["teacher"] == "embedded:smollm2-135m-instruct" and report.details["chunks"] == 1
    assert report.records_in == report.passed + report.rejected_total
    # the embedded model follows the worked example's format: its output parses into pairs
    assert report.details["pairs_generated"] >= 1
    for row in _rows(out):
        assert row["messages"][1]["content"].strip() and row["meta"]["support"] >= 0.7 and row["provenance"]["chunk"] == 0


def test_endpoint_requests_run_concurrently(server):
    """batch_size requests are in flight together (a remote teacher is latency-bound, not compute-bound)."""
    import time as _time

    s = server(_completion("Q: x?\nA: y"))
    in_flight, peak = [0], [0]
    lock = threading.Lock()
    handler = s.httpd.RequestHandlerClass
    original = handler.do_POST

    def slow_post(self):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        _time.sleep(0.2)
        try:
            original(self)
        finally:
            with lock:
                in_flight[0] -= 1

    handler.do_POST = slow_post
    teacher = EndpointTeacher(_opts(s.url, batch_size=4))
    prompts = [[Message("user", f"prompt {i}")] for i in range(4)]
    assert teacher(prompts) == ["Q: x?\nA: y"] * 4
    assert peak[0] == 4
    assert sorted(r["body"]["messages"][0]["content"] for r in s.requests) == [f"prompt {i}" for i in range(4)]

"""The OpenAI-compatible routes on the tiny model and two LoRA adapters: through FastAPI's TestClient, and
through the official `openai` SDK against a real uvicorn server in a thread."""

from __future__ import annotations

import json
import re
import threading
import time

import openai
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_serve_engine import lora_run

from hone.data.template import ensure_chat_template, render_prompt
from hone.records import Message
from hone.serve.engine import GenerationRequest, InferenceEngine
from hone.serve.openai_routes import ModelNotFoundError, inference_router

KEY = "sk-test-key"
CHAT = [{"role": "system", "content": "You route tickets."}, {"role": "user", "content": "Where is my package?"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("routes")
    ids = {"tiny": str(tiny_model_dir), "ft:tiny:support:aaa111": lora_run(root / "a", tiny_model_dir, 1),
           "ft:tiny:billing:bbb222": lora_run(root / "b", tiny_model_dir, 2)}
    seen = []

    def resolve_model(model_id, request):
        seen.append((model_id, request.url.path))
        if model_id not in ids:
            raise ModelNotFoundError(model_id)
        return ids[model_id]

    def require_key(authorization: str | None = Header(None)):
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, detail="missing or wrong API key")

    engine = InferenceEngine(batch_window_s=0.005)
    app = FastAPI()
    app.include_router(inference_router(resolve_model, require_key, engine=engine))
    yield {"app": app, "ids": ids, "engine": engine, "seen": seen, "client": TestClient(app)}
    engine.close()


def direct(served, model_id, **kw):
    """The same request straight to the engine, for comparison."""
    return served["engine"].generate(GenerationRequest(model=served["ids"][model_id], **kw), timeout=60)


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[6:]) for b in blocks[:-1]]


def test_chat_completion_matches_the_engine(served, tiny):
    client = served["client"]
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "ft:tiny:support:aaa111", "messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = ChatCompletion.model_validate(r.json())  # the SDK's own schema
    want = direct(served, "ft:tiny:support:aaa111", messages=CHAT, max_tokens=8)
    assert body.choices[0].message.content == want.text and body.choices[0].message.role == "assistant"
    assert body.choices[0].finish_reason == "length" and body.model == "ft:tiny:support:aaa111"
    tok = tiny[1]
    ensure_chat_template(tok)
    prompt_tokens = len(render_prompt(tok, [Message(**m) for m in CHAT]))
    assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (
        prompt_tokens, 8, prompt_tokens + 8)
    assert served["seen"][-1][0] == "ft:tiny:support:aaa111"
    # The other adapter and the base answer differently through the same route.
    other = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "ft:tiny:billing:bbb222", "messages": CHAT, "max_completion_tokens": 8, "temperature": 0}).json()
    assert other["choices"][0]["message"]["content"] == direct(served, "ft:tiny:billing:bbb222", messages=CHAT,
                                                               max_tokens=8).text != want.text


def test_completions_one_choice_per_prompt(served):
    r = served["client"].post("/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": ["hello team", "my invoice was charged twice"], "max_tokens": 5,
        "temperature": 0, "stop": "\n\n"})
    assert r.status_code == 200, r.text
    body = OpenAICompletion.model_validate(r.json())
    assert [c.index for c in body.choices] == [0, 1]
    for choice, prompt in zip(body.choices, ["hello team", "my invoice was charged twice"]):
        want = direct(served, "tiny", prompt=prompt, max_tokens=5, stop=["\n\n"])
        assert choice.text == want.text and choice.finish_reason == (
            "length" if want.finish_reason == "length" else "stop")
    assert body.usage.completion_tokens <= 10 and body.usage.prompt_tokens > 0


def test_chat_stream_is_sse_with_role_then_content(served):
    r = served["client"].post("/v1/chat/completions", headers=AUTH, json={
        "model": "ft:tiny:support:aaa111", "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse_events(r.text)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct(served, "ft:tiny:support:aaa111", messages=CHAT, max_tokens=12).text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream(served):
    r = served["client"].post("/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": "hello team", "max_tokens": 6, "temperature": 0, "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == direct(served, "tiny", prompt="hello team",
                                                                      max_tokens=6).text
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "ft:tiny:nope:000", "messages": CHAT}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "bogus": 1}, 400, "bogus"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 3000}]}, 400,
     "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt"),  # token ids: not served
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_naming_the_param(served, path, body, status, param):
    r = served["client"].post(path, headers=AUTH, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_body_that_is_not_json(served):
    r = served["client"].post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                              content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_every_route_needs_the_key(served):
    for path in ("/v1/chat/completions", "/v1/completions"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = served["client"].post(path, headers=headers, json={"model": "tiny", "prompt": "x",
                                                                   "messages": CHAT})
            assert r.status_code == 401, (path, headers)


@pytest.fixture(scope="module")
def server(served):
    import uvicorn

    config = uvicorn.Config(served["app"], host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(10)


def test_openai_sdk_chat_and_stream(served, server):
    client = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
    want = direct(served, "ft:tiny:billing:bbb222", messages=CHAT, max_tokens=10).text
    resp = client.chat.completions.create(model="ft:tiny:billing:bbb222", messages=CHAT, max_tokens=10,
                                          temperature=0)
    assert resp.choices[0].message.content == want and resp.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="ft:tiny:billing:bbb222", messages=CHAT, max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens
    sampled = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, seed=5)
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, seed=5)
    assert sampled.choices[0].message.content == again.choices[0].message.content
    text = client.completions.create(model="ft:tiny:support:aaa111", prompt="hello team", max_tokens=5,
                                     temperature=0)
    assert text.choices[0].text == direct(served, "ft:tiny:support:aaa111", prompt="hello team", max_tokens=5).text


def test_openai_sdk_errors(server):
    with pytest.raises(openai.NotFoundError) as e:
        openai.OpenAI(base_url=server, api_key=KEY, max_retries=0).chat.completions.create(
            model="ft:tiny:nope:000", messages=CHAT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=server, api_key=KEY, max_retries=0).chat.completions.create(
            model="tiny", messages=CHAT, n=3)
    assert e.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=CHAT)


def test_client_that_disconnects_cancels_its_generation(served, server):
    import httpx

    engine = served["engine"]
    before = engine.stats()["finished_cancelled"]
    with httpx.stream("POST", f"{server}/chat/completions", headers=AUTH, timeout=30, json={
            "model": "tiny", "messages": CHAT, "max_tokens": 1500, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # tokens are flowing: hang up
    deadline = time.monotonic() + 30
    while engine.stats()["finished_cancelled"] == before:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)


def test_openapi_documents_the_bodies(served):
    spec = served["app"].openapi()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "stream", "stop"} <= set(body["properties"])
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec))
    assert '"$ref"' not in json.dumps(spec).replace('"$ref": "#/components/schemas/', "")  # no other kind
    assert set(refs) <= set(spec.get("components", {}).get("schemas", {}))  # every reference resolves
    assert body["properties"]["messages"]["items"]["properties"]["role"]["enum"][:3] == ["system", "developer", "user"]

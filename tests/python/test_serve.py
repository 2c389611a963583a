"""``lorart serve`` end to end: real servers on 127.0.0.1 (free ports) with the embedded demo model,
talked to with the ``openai`` package and raw HTTP (httpx)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from tiny_models import adapter_with_own_tokenizer
from tokenizers import Tokenizer

from lorart import serve
from lorart.demo import DEMO, JA_PROMPT, ZH_PROMPT

MODEL = "demo"
ZH, JA = DEMO / "lora_zh", DEMO / "lora_ja"
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)


class Server:
    def __init__(self, **build_kwargs) -> None:
        build_kwargs.setdefault("model_dir", DEMO / "model")
        build_kwargs.setdefault("served_model_name", MODEL)
        build_kwargs.setdefault("max_seq_len", 128)
        build_kwargs.setdefault("num_threads", 1)
        self.app, self.engine = serve.build(**build_kwargs)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.http.post(path, content=data, **kw)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_root")
    shutil.copytree(ZH, root / "zh")
    # The same adapter converted to TensorRT-LLM's .npy pair (as `lorart convert` writes it).
    from lorart import hf, lora

    lora.save_npy(root / "zh_npy", *lora.from_peft(ZH, hf.load_config(DEMO / "model")))
    # Finite values that overflow float32 in the forward: the runtime's failure (a 500).
    import numpy as np

    weights, config = lora.from_peft(ZH, hf.load_config(DEMO / "model"))
    lora.save_npy(root / "blown", lora.LoraWeights(np.asarray(weights.numpy()) * 1e36), config)
    (root / "empty").mkdir()
    shutil.copytree(ZH, root / "bad_template")  # a tokenizer_config.json that is no object
    (root / "bad_template" / "tokenizer_config.json").write_text("[1, 2]")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(JA, outside / "ja")
    os.symlink(outside / "ja", root / "escape")  # a symlink that leaves the root
    return root


@pytest.fixture(scope="module")
def srv(lora_root):
    s = Server(lora_modules=[("zh", ZH), ("ja", JA)], lora_root=lora_root)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """API key, no --lora-root, room for one request, 2 KiB bodies; a chat template."""
    model = tmp_path_factory.mktemp("chat_model")
    for f in (DEMO / "model").iterdir():
        shutil.copy(f, model / f.name)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    s = Server(model_dir=model, api_key="sesame", max_queue=1, max_body_bytes=2048)
    yield s
    s.stop()


def complete(s: Server, model: str, prompt, **kw) -> dict:
    r = s.post("/v1/completions", {"model": model, "prompt": prompt, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def events(s: Server, body: dict, **kw) -> list:
    out = []
    with s.http.stream("POST", "/v1/completions", json=body, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    assert out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_health_and_models(srv):
    assert srv.http.get("/health").json() == {"status": "ok"}
    models = srv.http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["parent"]) for m in models["data"]] == [
        (MODEL, None),
        ("zh", MODEL),
        ("ja", MODEL),
    ]


def test_each_model_name_answers_as_the_offline_llm_does(srv):
    cases = [(MODEL, ZH_PROMPT, None), ("zh", ZH_PROMPT, ZH), ("ja", JA_PROMPT, JA)]
    expected = srv.engine.llm.generate(
        [c[1] for c in cases], lora=[c[2] for c in cases], max_new_tokens=12, top_k=1
    )
    for (name, prompt, _), want in zip(cases, expected, strict=True):
        got = complete(srv, name, prompt, max_tokens=12)
        assert got["object"] == "text_completion" and got["model"] == name
        [choice] = got["choices"]
        assert choice["text"] == want.text, name
        assert choice["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
        prompt_tokens = len(srv.engine.encode(prompt))
        assert got["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(want.token_ids),
            "total_tokens": prompt_tokens + len(want.token_ids),
        }
    # The seed's answers: the base in English, the adapters in their languages.
    assert [e.text for e in expected] == ["Washington, D.C.", "华盛顿。", "ワシントン D.C."]


def test_token_id_prompts_and_batches_of_prompts(srv):
    ids = srv.engine.encode(JA_PROMPT)
    by_text = complete(srv, "ja", JA_PROMPT, max_tokens=8)["choices"][0]["text"]
    assert complete(srv, "ja", ids, max_tokens=8)["choices"][0]["text"] == by_text
    both = complete(srv, "ja", [ZH_PROMPT, JA_PROMPT], max_tokens=8)["choices"]
    assert [c["index"] for c in both] == [0, 1]
    assert both[1]["text"] == by_text


def test_streaming_gives_the_same_text_and_ends_with_done(srv):
    whole = complete(srv, "zh", ZH_PROMPT, max_tokens=12)["choices"][0]
    body = {"model": "zh", "prompt": ZH_PROMPT, "max_tokens": 12, "temperature": 0}
    body.update(stream=True, stream_options={"include_usage": True})
    chunks = events(srv, body)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == whole["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_stop_strings_cut_the_text_and_end_the_request(srv):
    full = complete(srv, "zh", ZH_PROMPT, max_tokens=12)["choices"][0]["text"]
    assert len(full) >= 3
    stop = full[2]
    got = complete(srv, "zh", ZH_PROMPT, max_tokens=12, stop=[stop, "never"])["choices"][0]
    assert got["text"] == full[: full.index(stop)]
    assert got["finish_reason"] == "stop"
    chunks = events(
        srv,
        {
            "model": "zh",
            "prompt": ZH_PROMPT,
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stop": stop,
        },
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.index(stop)]


def test_logprobs_of_the_sampled_tokens(srv):
    got = complete(srv, "ja", JA_PROMPT, max_tokens=6, logprobs=1, stop_token_ids=[])
    lp = got["choices"][0]["logprobs"]
    n = got["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert all(v <= 0.0 for v in lp["token_logprobs"])
    error_of(srv.post("/v1/completions", {"model": "ja", "prompt": "x", "logprobs": 3}), 400)


def test_the_openai_client_works_unchanged(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL, "zh", "ja"]
    whole = client.completions.create(model="ja", prompt=JA_PROMPT, max_tokens=8, temperature=0)
    stream = client.completions.create(
        model="ja", prompt=JA_PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert whole.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_errors_have_the_right_status_and_name_the_field(srv):
    post = srv.post
    assert "not valid JSON" in error_of(post("/v1/completions", b"{bad"), 400)["message"]
    assert error_of(post("/v1/completions", [1, 2]), 400)["message"].startswith("the request")
    assert error_of(post("/v1/completions", {"prompt": "x"}), 400)["param"] == "model"
    err = error_of(post("/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and "'nope'" in err["message"]
    for field, value in [
        ("n", 2),
        ("temperature", 5),
        ("top_p", 0),
        ("max_tokens", 0),
        ("stop", ["a"] * 5),
        ("presence_penalty", 0.5),
        ("seed", -1),
    ]:
        err = error_of(post("/v1/completions", {"model": MODEL, "prompt": "x", field: value}), 400)
        assert err["param"] == field, (field, err)
    err = error_of(post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 500}), 400)
    assert "exceeds the model's max_seq_len 128" in err["message"]
    err = error_of(post("/v1/completions", {"model": MODEL, "prompt": [10**6]}), 400)
    assert "out of the vocabulary" in err["message"]  # the executor's check, as a 400
    err = error_of(post("/v1/completions", {"model": MODEL, "prompt": [2**40]}), 400)
    assert err["param"] == "prompt" and "[0, 2^31)" in err["message"]
    assert error_of(srv.http.get("/v1/nothing"), 404)["message"].startswith("GET /v1/nothing")
    # The server keeps serving.
    assert complete(srv, "zh", ZH_PROMPT, max_tokens=4)["choices"][0]["text"]


def test_adapters_load_and_unload_at_run_time(srv, lora_root):
    load = lambda body: srv.post("/v1/load_lora_adapter", body)  # noqa: E731
    unload = lambda body: srv.post("/v1/unload_lora_adapter", body)  # noqa: E731
    expected = complete(srv, "zh", ZH_PROMPT, max_tokens=8)["choices"][0]["text"]
    r = load({"lora_name": "zh2", "lora_path": "zh"})
    assert r.status_code == 200, r.text
    assert complete(srv, "zh2", ZH_PROMPT, max_tokens=8)["choices"][0]["text"] == expected
    assert "zh2" in [m["id"] for m in srv.http.get("/v1/models").json()["data"]]
    assert error_of(load({"lora_name": "zh2", "lora_path": "zh"}), 400)["param"] == "lora_name"
    assert error_of(load({"lora_name": MODEL, "lora_path": "zh"}), 400)["param"] == "lora_name"
    r = load({"lora_name": "zh-npy", "lora_path": "zh_npy"})
    assert r.status_code == 200, r.text
    assert complete(srv, "zh-npy", ZH_PROMPT, max_tokens=8)["choices"][0]["text"] == expected
    assert unload({"lora_name": "zh-npy"}).status_code == 200
    assert load({"lora_name": "blown", "lora_path": "blown"}).status_code == 200
    err = error_of(srv.post("/v1/completions", {"model": "blown", "prompt": ZH_PROMPT}), 500)
    assert "not finite" in err["message"] and err["type"] == "internal_error"
    assert unload({"lora_name": "blown"}).status_code == 200
    assert unload({"lora_name": "zh2"}).status_code == 200
    error_of(srv.post("/v1/completions", {"model": "zh2", "prompt": "x"}), 404)
    error_of(unload({"lora_name": "zh2"}), 404)
    # Outside the root: traversal, an absolute path elsewhere, a symlink that escapes.
    for path in ("../outside", str(JA), "escape", "zh/../../x"):
        err = error_of(load({"lora_name": "bad", "lora_path": path}), 403)
        assert "outside --lora-root" in err["message"], path
    error_of(load({"lora_name": "bad", "lora_path": "missing"}), 404)
    err = error_of(load({"lora_name": "bad", "lora_path": "empty"}), 400)
    assert "adapter 'bad'" in err["message"]
    err = error_of(load({"lora_name": "bad", "lora_path": "bad_template"}), 400)
    assert "tokenizer_config.json: expected a JSON object, got list" in err["message"]
    error_of(load({"lora_name": "bad"}), 400)
    assert "bad" not in [m["id"] for m in srv.http.get("/v1/models").json()["data"]]


def abort_count(s: Server, model: str, headers=None) -> float:
    text = s.http.get("/metrics", headers=headers or {}).text
    key = f'lorart:requests_total{{finish_reason="abort",model="{model}"}} '
    return sum(float(line[len(key) :]) for line in text.splitlines() if line.startswith(key))


@pytest.fixture
def slow_steps(monkeypatch):
    """Every chunk after a generation's first takes 1 s more: requests outlive a client."""
    from lorart.serve import engine

    original = engine.Generation.next

    async def slow(self):
        if self.token_ids:
            await asyncio.sleep(1.0)
        return await original(self)

    monkeypatch.setattr(engine.Generation, "next", slow)


@pytest.mark.parametrize(
    "which,stream", [("srv", False), ("srv", True), ("strict", False), ("strict", True)]
)
def test_a_client_that_disconnects_cancels_its_request(request, slow_steps, which, stream):
    """Also behind the API key's middleware, which must not hide the disconnect."""
    s = request.getfixturevalue(which)
    model = "ja" if which == "srv" else MODEL
    headers = {"Authorization": "Bearer sesame"} if which == "strict" else {}
    before = abort_count(s, model, headers)
    body = {
        "model": model,
        "prompt": JA_PROMPT,
        "max_tokens": 100,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        with s.http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            next(r.iter_lines())  # one chunk, then the client goes away
    else:
        with pytest.raises(httpx.ReadTimeout):
            s.http.post("/v1/completions", json=body, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 10
    while abort_count(s, model, headers) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert abort_count(s, model, headers) == before + 1  # ended as aborted, not run to its end
    while s.engine.executor.stats()["uncollected"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.engine._active == 0
    assert s.engine.executor.stats()["uncollected"] == 0


def test_metrics_after_traffic(srv):
    complete(srv, "ja", JA_PROMPT, max_tokens=4)
    text = srv.http.get("/metrics").text
    for needle in [
        'lorart:requests_total{finish_reason="',
        'model="ja"',
        "lorart:prompt_tokens_total",
        "lorart:generation_tokens_total",
        "lorart:time_to_first_token_seconds_bucket",
        "lorart:time_per_output_token_seconds_bucket",
        "lorart:e2e_request_latency_seconds_count",
        "lorart:num_requests_running",
        "lorart:num_requests_waiting",
        "lorart:kv_blocks_free",
        "lorart:kv_blocks_used",
        "lorart:lora_cache_hits_total",
        "lorart:lora_cache_misses_total",
        'lorart:lora_cache_evictions_total{level="device"}',
        'lorart:lora_cache_bytes{level="host"}',
        'lorart:lora_adapters_resident{level="device"}',
        "lorart:lora_adapters_loaded",
    ]:
        assert needle in text, needle


def test_api_key_queue_limit_body_limit_and_chat(strict):
    assert strict.http.get("/health").status_code == 200  # no key needed
    error_of(strict.http.get("/v1/models"), 401)
    error_of(strict.http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    key = {"Authorization": "Bearer sesame"}
    assert strict.http.get("/v1/models", headers=key).status_code == 200
    big = {"model": MODEL, "prompt": "x" * 4000}
    error_of(strict.post("/v1/completions", big, headers=key), 413)
    err = error_of(
        strict.post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "b"}, headers=key), 403
    )
    assert "--lora-root" in err["message"]
    client = openai.OpenAI(base_url=strict.url + "/v1", api_key="sesame")
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ZH_PROMPT}],
        max_tokens=8,
        temperature=0,
    )
    plain = client.completions.create(model=MODEL, prompt=ZH_PROMPT, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text  # the template is identity
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ZH_PROMPT}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        plain.choices[0].text
    )
    with pytest.raises(openai.BadRequestError, match="no system"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "x"}])
    # A generation the server holds (never read, so never finished) fills --max-queue 1: the
    # next request gets 429, and once it ends the server takes requests again.
    loop = strict.engine.dispatcher.loop

    async def hold():
        return strict.engine.start(MODEL, None, [1, 2, 3], serve.protocol.Sampling(max_tokens=4))

    held = asyncio.run_coroutine_threadsafe(hold(), loop).result(10)
    try:
        err = error_of(
            strict.post("/v1/completions", {"model": MODEL, "prompt": "x"}, headers=key), 429
        )
        assert "--max-queue" in err["message"] and err["type"] == "rate_limit_error"
    finally:
        loop.call_soon_threadsafe(held.close)
    ok = strict.post(
        "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, headers=key
    )
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------------
# Adapters with their own tokenizer.json and chat template

IDENTITY = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
BRACKETS = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A server whose base has the BRACKETS chat template, with lora_ja under a tokenizer and an
    IDENTITY template of its own ("own", also loadable at run time from its --lora-root),
    lora_zh, which has neither, and lora_ko ("ko"), with its own vocabulary and tokenizer."""
    root = tmp_path_factory.mktemp("own_root")
    adapter = adapter_with_own_tokenizer(JA, root / "own", chat_template=IDENTITY)
    model = tmp_path_factory.mktemp("bracket_model")
    for f in (DEMO / "model").iterdir():
        shutil.copy(f, model / f.name)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = BRACKETS
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    modules = [("own", adapter), ("zh", ZH), ("ko", DEMO / "lora_ko")]
    s = Server(model_dir=model, lora_modules=modules, lora_root=root)
    s.tokenizer = Tokenizer.from_file(str(adapter / "tokenizer.json"))
    yield s
    s.stop()


def test_an_adapters_own_tokenizer_tokenizes_and_detokenizes_its_requests(own):
    mine = complete(own, "own", JA_PROMPT, max_tokens=12, return_token_ids=True)["choices"][0]
    assert mine["prompt_token_ids"] == own.tokenizer.encode(JA_PROMPT).ids  # no <s>
    assert mine["text"] == own.tokenizer.decode(mine["token_ids"]) == "_ワシントン_D.C."
    base = complete(own, MODEL, JA_PROMPT, max_tokens=12, return_token_ids=True)["choices"][0]
    assert base["prompt_token_ids"] == [1, *mine["prompt_token_ids"]]
    assert base["text"] == "Washington, D.C."
    body = {"model": "own", "prompt": JA_PROMPT, "max_tokens": 12, "temperature": 0}
    chunks = events(own, {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == mine["text"]
    lp = complete(own, "own", JA_PROMPT, max_tokens=12, logprobs=1)["choices"][0]["logprobs"]
    want = [own.tokenizer.decode([t], skip_special_tokens=False) for t in mine["token_ids"]]
    assert lp["tokens"] == want and any(t.startswith("_") for t in want)  # its own decoder
    # Loaded at run time from the same directory: the same tokenizer.
    r = own.post("/v1/load_lora_adapter", {"lora_name": "own2", "lora_path": "own"})
    assert r.status_code == 200, r.text
    again = complete(own, "own2", JA_PROMPT, max_tokens=12)["choices"][0]["text"]
    assert again == mine["text"]


def test_an_adapter_with_its_own_vocabulary_answers_beside_the_base(own):
    from lorart.demo import KO_PROMPT

    ko_tok = Tokenizer.from_file(str(DEMO / "lora_ko" / "tokenizer.json"))
    got = complete(own, "ko", KO_PROMPT, max_tokens=12, return_token_ids=True, logprobs=1)
    [choice] = got["choices"]
    assert choice["prompt_token_ids"] == ko_tok.encode(KO_PROMPT).ids
    assert choice["text"] == "워싱턴 D.C." and max(choice["token_ids"]) >= 1024
    assert "워싱턴" in choice["logprobs"]["tokens"]  # a token only its vocabulary has
    # Its ids are its own: as a prompt or a stop token, accepted for it, refused for the base.
    ids = choice["prompt_token_ids"]
    assert complete(own, "ko", ids, max_tokens=12)["choices"][0]["text"] == "워싱턴 D.C."
    stopped = complete(own, "ko", ids, max_tokens=12, stop_token_ids=[choice["token_ids"][1]])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    err = error_of(own.post("/v1/completions", {"model": MODEL, "prompt": ids}), 400)
    assert "1034" in err["message"] and "1024" in err["message"]
    body = {"model": MODEL, "prompt": "x", "stop_token_ids": [1090]}
    assert (
        "past the vocabulary (1024)" in error_of(own.post("/v1/completions", body), 400)["message"]
    )
    body = {"model": "ko", "prompt": "x", "stop_token_ids": [1094]}
    assert (
        "past the vocabulary (1094)" in error_of(own.post("/v1/completions", body), 400)["message"]
    )


def test_an_adapters_own_chat_template_renders_its_messages(own):
    client = openai.OpenAI(base_url=own.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": JA_PROMPT}]

    def chat(model):
        return client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0
        )

    # "own": its IDENTITY template and its tokenizer (which adds no <s> either way).
    got = chat("own")
    assert got.choices[0].message.content == "_ワシントン_D.C."
    assert got.usage.prompt_tokens == len(own.tokenizer.encode(JA_PROMPT).ids)
    # lora_zh has no template: the base's BRACKETS, with the base tokenizer.
    base_tok = own.engine.llm.tokenizer
    bracketed = base_tok.encode(f"[{JA_PROMPT}]", add_special_tokens=False).ids
    assert chat("zh").usage.prompt_tokens == chat(MODEL).usage.prompt_tokens == len(bracketed)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_and_exits_cleanly():
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorart",
            "serve",
            "--port",
            str(port),
            "--max-seq-len",
            "128",
            "--threads",
            "1",
            "--served-model-name",
            MODEL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        body = {
            "model": MODEL,
            "prompt": ZH_PROMPT,
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)  # with the stream under way
                lines.append(line)
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # drained
        assert proc.wait(30) == 0
        assert "stopped by SIGTERM" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_the_seeds_six_concurrent_clients_print_the_demo_table():
    """examples/multi_lora_client.py run six at once, as the seed's shell loop does (top-p 0.5,
    10 tokens, task uids -1 0 1 -1 0 1): each answer is the demo table's."""
    import subprocess
    import sys

    client = Path(__file__).resolve().parents[2] / "examples" / "multi_lora_client.py"
    s = Server(lora_root=DEMO)
    try:
        texts = [ZH_PROMPT] * 3 + [JA_PROMPT] * 3
        paths = ["", "lora_zh", "lora_ja"] * 2
        expected = s.engine.llm.generate(
            texts, lora=[DEMO / p if p else None for p in paths], max_new_tokens=10, top_k=1
        )
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(client),
                    "--top-k",
                    "0",
                    "--top-p",
                    "0.5",
                    "--request-output-len",
                    "10",
                    "--text",
                    text,
                    "--tokenizer-dir",
                    str(DEMO / "model"),
                    "--url",
                    s.url,
                    *(["--lora-path", p] if p else []),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for text, p in zip(texts, paths, strict=True)
        ]
        for proc, text, want in zip(procs, texts, expected, strict=True):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            lines = out.splitlines()
            assert lines[0].startswith("Input sequence:  [1, ")
            assert lines[1:4] == [
                "Got completed request",
                f"Input: {text}",
                f"Output beam 0: {want.text}",
            ]
            ids = json.loads(lines[4].removeprefix("Output sequence:  "))
            assert ids == want.prompt_token_ids + want.token_ids
    finally:
        s.stop()

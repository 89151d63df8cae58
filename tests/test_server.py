"""kvcells-server over HTTP on 127.0.0.1: the official openai client, raw
httpx for the error bodies, outputs held to kvcells.generate on the same
prompt. Servers run in a thread of this process (uvicorn on an ephemeral
port) or, for SIGTERM, as a subprocess; each is stopped by its fixture."""
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from kvcells import Context, Model, Sampler, generate
from kvcells import server

PROMPTS = ["The capital city of France is called", "Water boils at a temperature of",
           "The first man on the moon was", "A haiku about autumn:", "def fibonacci(n):",
           "The largest planet in the solar system is", "To make bread you need",
           "My favourite colour is", "The opposite of hot is", "Once upon a time there was",
           "The speed of light is", "Photosynthesis is the process", "In 1492, Columbus",
           "The three primary colours are", "Python is a programming language that",
           "The chemical symbol for gold is"]


@contextlib.contextmanager
def running_server(argv):
    """A kvcells-server in a thread of this process; yields (base url, Service)."""
    service = server.Service(server.parse_args([str(a) for a in argv]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(service.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while not service.ready:
            assert service.load_error is None and time.monotonic() < deadline, service.load_error
            time.sleep(0.05)
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield url, service
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def model(real_model_path):
    return Model.load(real_model_path)


@pytest.fixture(scope="module")
def gemma(real_model_path):
    with running_server(["-m", real_model_path, "-c", "2048", "-np", "16"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(gemma):
    return openai.OpenAI(base_url=gemma[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def solo(model):
    """solo(prompt ids, max_tokens, sampler) -> the text plain decoding gives alone."""
    ctx = Context(model, n_ctx=2048)

    def run(ids, max_tokens, sampler=None):
        ctx.memory.clear()
        return model.tokenizer.decode(list(generate(ctx, ids, max_tokens, sampler, lookup=False)))
    return run


def gemma_chat(*turns):
    """Gemma 3's documented format, written out by hand."""
    return "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in turns) + \
        "<start_of_turn>model\n"


def metrics(url, **kw):
    text = httpx.get(url + "/metrics", **kw).text
    return {m[0]: float(m[1]) for m in re.findall(r"^kvcells_(\w+) (\S+)$", text, re.M)}


def wait_metrics(url, until, seconds=10, **kw):
    """The metrics once until(metrics) holds (the engine updates them after
    its step, a moment after the tokens of that step have gone out)."""
    deadline = time.monotonic() + seconds
    while not until(m := metrics(url, **kw)):
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    return m


def wait_idle(url, seconds=10, **kw):
    return wait_metrics(url, lambda m: not m["requests_running"] and not m["requests_waiting"],
                        seconds, **kw)


# ---- completions and chat with the openai client ----

def test_completion_greedy_equals_generate(client, model, solo):
    prompt = PROMPTS[0]
    ids = model.tokenizer.encode(prompt)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == solo(ids, 8)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    assert r.usage.total_tokens == len(ids) + 8


def test_completion_stream_equals_generate(client, model, solo):
    prompt = PROMPTS[1]
    ids = model.tokenizer.encode(prompt)
    chunks = list(client.completions.create(model="x", prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == solo(ids, 8)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_prompt_as_token_ids(client, model, solo):
    ids = model.tokenizer.encode(PROMPTS[2])
    r = client.completions.create(model="x", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == solo(ids, 6)


def test_chat_greedy_equals_generate_on_gemmas_format(client, model, solo):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected = gemma_chat(("user", "Answer briefly.\n\nWhat is the capital of France?"))
    ids = model.tokenizer.encode(expected, special=True)
    want = solo(ids, 8)
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


@pytest.mark.parametrize("messages, text", [
    ([{"role": "user", "content": "Hi"}], gemma_chat(("user", "Hi"))),
    ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
     gemma_chat(("user", "Be kind.\n\nHi"))),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Bye"}],
     gemma_chat(("user", "Hi"), ("model", "Hello!"), ("user", "Bye"))),
])
def test_rendered_chat_is_gemmas_format(gemma, messages, text):
    r = httpx.post(gemma[0] + "/apply-template", json={"messages": messages})
    assert r.status_code == 200 and r.json()["prompt"] == "<bos>" + text


def test_n_choices_with_a_seed_follow_the_sampler(client, model, solo):
    prompt = PROMPTS[3]
    ids = model.tokenizer.encode(prompt)
    kw = dict(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=6, n=3, seed=11,
                                  extra_body={"top_k": 50, "min_p": 0.02, "repeat_penalty": 1.1},
                                  **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        sampler = Sampler(top_k=50, min_p=0.02, repeat_penalty=1.1, seed=11 + i, **kw)
        assert c.text == solo(ids, 6, sampler)
    assert len({c.text for c in r.choices}) > 1
    chunks = client.completions.create(model="x", prompt=prompt, max_tokens=6, n=3, seed=11,
                                       stream=True, extra_body={"top_k": 50, "min_p": 0.02,
                                                                "repeat_penalty": 1.1}, **kw)
    streamed = ["", "", ""]
    for c in chunks:
        streamed[c.choices[0].index] += c.choices[0].text
    assert streamed == [c.text for c in r.choices]


def test_sixteen_concurrent_streams_get_their_solo_tokens(gemma, model, solo):
    want = [solo(model.tokenizer.encode(p), 6) for p in PROMPTS]
    aclient = openai.AsyncOpenAI(base_url=gemma[0] + "/v1", api_key="unused", max_retries=0,
                                 timeout=120)

    async def one(prompt):
        stream = await aclient.completions.create(model="x", prompt=prompt, max_tokens=6,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        try:
            return await asyncio.gather(*map(one, PROMPTS))
        finally:
            await aclient.close()
    assert asyncio.run(all_of_them()) == want


def test_a_repeated_long_prompt_comes_from_the_cache(client, model, solo):
    prompt = "Here is a long story about a lighthouse keeper. " * 20 + "The keeper said"
    ids = model.tokenizer.encode(prompt)
    first = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == len(ids) > 200
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < len(ids)
    assert first.choices[0].text == second.choices[0].text == solo(ids, 4)


# ---- stop strings and incremental text ----

@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, model, solo, stream):
    prompt = PROMPTS[0]
    full = solo(model.tokenizer.encode(prompt), 12)
    stop = full[5:12]           # straddles token boundaries somewhere in the middle
    r = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop, "never appears"], stream=stream)
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_inside_drafted_text_cuts_where_plain_decoding_does(gemma, client, model,
                                                                          stream):
    """A document quoted word for word is drafted by prompt lookup, so the
    stop string can fall inside accepted drafts: the text and the token
    count are plain decoding's up to the stop. How many drafted tokens go in
    depends on the draft budget's measured step times (as few as 6 were seen),
    so only that some were accepted is required."""
    doc = ("The lighthouse stands on the northern cape. Its lamp was first lit in 1852 and "
           "has guided ships past the reef every night since then.")
    prompt = f"Document: {doc}\n\nQuote the document exactly.\nQuote: {doc[:20]}"
    ctx = Context(model, n_ctx=512)
    plain = list(generate(ctx, model.tokenizer.encode(prompt), 32, lookup=False))
    full = model.tokenizer.decode(plain)
    stop = full[40:48]
    n_tokens = next(k for k in range(1, 33) if stop in model.tokenizer.decode(plain[:k]))
    before = wait_idle(gemma[0])
    r = client.completions.create(model="x", prompt=prompt, max_tokens=32, temperature=0,
                                  stop=stop, stream=stream,
                                  **({"stream_options": {"include_usage": True}} if stream else {}))
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == n_tokens
    after = wait_idle(gemma[0])
    assert after["draft_tokens_accepted_total"] > before["draft_tokens_accepted_total"]


def test_choice_text_never_splits_a_character_and_holds_back_stops(model):
    tok = model.tokenizer
    ids = tok.encode("🦙 llama café 日本語 end", add_bos=False)
    c = server.Choice(tok, ["日本語 e", "xyz"])
    parts = []
    for t in ids:
        stopped = c.add(t)
        parts.append(c.take())
        if stopped:
            break
    assert "".join(parts) == "🦙 llama café "
    assert all("\ufffd" not in p for p in parts)
    assert c.finish_reason == "stop"


# ---- the other endpoints ----

def test_models_tokenize_detokenize(gemma, model, real_model_path):
    url = gemma[0]
    data = httpx.get(url + "/v1/models").json()["data"]
    assert data[0]["id"] == os.path.basename(real_model_path)
    text = "Hello <start_of_turn> world"
    r = httpx.post(url + "/tokenize", json={"content": text}).json()
    assert r["tokens"] == model.tokenizer.encode(text, add_bos=False, special=True)
    r = httpx.post(url + "/tokenize", json={"content": text, "add_special": True,
                                            "parse_special": False}).json()
    assert r["tokens"] == model.tokenizer.encode(text, add_bos=True, special=False)
    ids = model.tokenizer.encode("café 🦙", add_bos=False)
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json() == {"content": "café 🦙"}


def test_metrics_count_tokens_and_cells(gemma, client, model):
    url = gemma[0]
    prompt = "Counting tokens for the metrics endpoint"
    before = wait_idle(url)
    client.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = wait_idle(url)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == \
        len(model.tokenizer.encode(prompt))
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == 5
    assert after["kv_cells_total"] == 2048
    assert 0 < after["kv_cells_used"] <= 2048
    assert {"prompt_tokens_cached_total", "evictions_total"} <= set(after)


def test_slots_show_a_running_request(gemma, model):
    url = gemma[0]
    prompt = PROMPTS[4]
    with httpx.stream("POST", url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()      # kept: a dropped iterator closes the stream
        next(lines)
        slots = httpx.get(url + "/slots").json()
    assert len(slots) == 16
    busy = [s for s in slots if s["is_processing"]]
    assert len(busy) == 1 and busy[0]["n_prompt_tokens"] == len(model.tokenizer.encode(prompt))
    assert busy[0]["n_decoded"] >= 1


# ---- robustness ----

def test_a_disconnect_mid_stream_frees_the_request(gemma, client, model, solo):
    url = gemma[0]
    with httpx.stream("POST", url + "/v1/completions", json={
            "prompt": PROMPTS[5], "max_tokens": 500, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines)
        wait_metrics(url, lambda m: m["requests_running"] == 1)
    wait_idle(url, 5)          # 500 tokens would take far longer than this
    ids = model.tokenizer.encode(PROMPTS[6])
    r = client.completions.create(model="x", prompt=PROMPTS[6], max_tokens=5, temperature=0)
    assert r.choices[0].text == solo(ids, 5)


def test_an_internal_error_fails_one_request_and_the_server_goes_on(gemma, client):
    url, service = gemma
    ctx = service.engine.ctx

    def broken(batch):
        del ctx.decode                  # only this once
        raise RuntimeError("injected fault")
    ctx.decode = broken
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "injected" in r.json()["error"]["message"]
    r = client.completions.create(model="x", prompt="Hello", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_request_without_a_token_for_timeout_seconds_gets_503(gemma, client):
    url, service = gemma
    ctx = service.engine.ctx

    def slow(batch):
        del ctx.decode
        time.sleep(2.5)
        return ctx.decode(batch)
    service.args.timeout, ctx.decode = 1.0, slow
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    finally:
        service.args.timeout = 600
    assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
    wait_idle(url)
    assert client.completions.create(model="x", prompt="Hello", max_tokens=2).choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logit_bias": {}}, "logit_bias"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_parameters_get_400(gemma, body, param):
    r = httpx.post(gemma[0] + "/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert param in err["message"] or "token" in err["message"]


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": "x"}], "prompt": "y"},
])
def test_bad_chats_get_400(gemma, body):
    r = httpx.post(gemma[0] + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_invalid_json_too_long_prompts_and_unknown_paths(gemma):
    url = gemma[0]
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x",')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", content=b'["prompt"]')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", json={"prompt": "word " * 2100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "2048" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(url + "/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="x", prompt="x", temperature=-1)


# ---- a tiny model: keys, the queue bound, no chat template ----

@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    with running_server(["-m", tiny_gguf("llama"), "-c", "8192", "-np", "1", "--max-waiting", "0",
                         "--api-key", "sesame", "--no-prefix-cache"]) as s:
        yield s[0]


KEY = {"Authorization": "Bearer sesame"}


def test_the_api_key_guards_every_endpoint_but_health(tiny):
    assert httpx.get(tiny + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/slots", "/nowhere"):
        r = httpx.get(tiny + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(tiny + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(tiny + "/v1/models", headers=KEY).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=tiny + "/v1", api_key="sesame", max_retries=0)
    r = good.completions.create(model="x", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_a_model_without_a_chat_template_gets_400_on_chat(tiny):
    r = httpx.post(tiny + "/v1/chat/completions", headers=KEY,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_a_full_queue_answers_503_at_once(tiny):
    body = {"prompt": "a b c", "max_tokens": 8000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny + "/v1/completions", json=body, headers=KEY) as first:
        lines = first.iter_lines()
        next(lines)
        r = httpx.post(tiny + "/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        wait_metrics(tiny, lambda m: m["requests_running"] == 1, headers=KEY)   # the first still runs
    wait_metrics(tiny, lambda m: m["kv_cells_used"] == 0, 5, headers=KEY)      # freed on disconnect
    r = httpx.post(tiny + "/v1/completions", headers=KEY,
                   json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- the command ----

def test_sigterm_finishes_the_stream_in_flight_and_exits_0(tiny_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "kvcells.server", "-m", str(tiny_gguf("llama")),
                             "--port", "0", "-c", "512"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
                break
        assert url
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = {"prompt": "a b c", "max_tokens": 300, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        proc.kill()
        proc.wait()

"""kvcells-server: an OpenAI-compatible HTTP server over the continuous-batching
Engine, like llama.cpp's llama-server where their flags and endpoints overlap.

One engine thread runs Engine.step() in a loop. Request handlers run on the
asyncio event loop: they submit to the engine (thread-safe) and receive each
token through their own asyncio.Queue, fed from the engine thread with
loop.call_soon_threadsafe. Anything else the handlers need from the engine
(the running requests for /slots) runs on the engine thread between steps;
/metrics reads the engine's snapshot of its figures.

The app is plain Starlette on uvicorn, the ASGI stack FastAPI itself sits on:
requests are validated by hand so that every error has an OpenAI-style body
naming the problem, which is what FastAPI's pydantic models would need to be
overridden for; the rest of FastAPI (docs pages, dependency injection) this
server does not use.
"""
import argparse
import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from .chat_template import ChatTemplate, ChatTemplateError
from .cli import default_model_path
from .context import KV_TYPES, Context
from .engine import Engine
from .model import Model
from .sampling import Sampler

log = logging.getLogger("kvcells.server")

SPARE_SEQ_IDS = 8           # sequence ids beyond the slots: cached prefixes and checkpoints (docs/engine.md)
MAX_N = 16                  # choices per request
MAX_STOPS = 4               # stop strings per request, as OpenAI allows
SHUTDOWN_GRACE_S = 10       # on SIGTERM, requests in flight get this long before they are cancelled
POLL_S = 0.5                # how often a waiting handler checks its client is still there


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="kvcells-server", description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="KV cells shared by all slots")
    ap.add_argument("-np", "--parallel", type=int, default=4, help="requests decoded together (slots)")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--cache-type-k", "-ctk", default="f16", choices=KV_TYPES)
    ap.add_argument("--cache-type-v", "-ctv", default="f16", choices=KV_TYPES)
    ap.add_argument("--api-key", help="bearer key every endpoint but /health requires")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds a request may wait for its next token before it fails (503)")
    ap.add_argument("--max-waiting", type=int, default=64,
                    help="requests queued beyond the slots; more get 503 at once")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="free finished sequences and compute every prompt in full")
    ap.add_argument("--no-lookup", action="store_true",
                    help="one token per step for each request, without prompt-lookup drafts")
    ap.add_argument("--chat-template", metavar="NAME", help="a built-in chat template by name")
    ap.add_argument("--chat-template-file", metavar="FILE", help="a Jinja chat template file")
    ap.add_argument("--replicas", type=int, default=1,
                    help="engines on Ray Serve behind this port (RAY_ADDRESS: the cluster to join)")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    args = ap.parse_args(argv)
    if not 1 <= args.parallel <= 256 - SPARE_SEQ_IDS:
        ap.error(f"-np must be in [1, {256 - SPARE_SEQ_IDS}]")
    if args.timeout <= 0 or args.max_waiting < 0:
        ap.error("--timeout must be > 0 and --max-waiting >= 0")
    if args.replicas < 1 or args.replica_cpus <= 0:
        ap.error("--replicas must be >= 1 and --replica-cpus > 0")
    return args


# ---- errors ----

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 500: "server_error", 503: "unavailable_error"}


class APIError(Exception):
    def __init__(self, status, message, code, param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self):
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "code": self.code, "param": self.param}}

    def response(self):
        return JSONResponse(self.body(), self.status)


async def on_api_error(request, e):
    return e.response()


async def on_http_error(request, e):
    return APIError(e.status_code, e.detail, "not_found" if e.status_code == 404 else
                    "method_not_allowed" if e.status_code == 405 else "http_error").response()


async def on_client_gone(request, e):
    return PlainTextResponse("client closed the request", 499)


async def on_chat_template_error(request, e):
    return APIError(400, str(e), "invalid_value", "messages").response()


async def on_internal_error(request, e):
    log.error("internal error on %s", request.url.path, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").response()


class BearerAuth:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app, key):
        self.app, self.expect = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expect):
                response = APIError(401, "invalid or missing API key", "invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- request validation ----

def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_stop(v):
    return isinstance(v, str) and v != "" or (
        isinstance(v, list) and len(v) <= MAX_STOPS and all(isinstance(s, str) and s for s in v))


def is_stream_options(v):
    return isinstance(v, dict) and set(v) <= {"include_usage"} and isinstance(
        v.get("include_usage", False), bool)


def is_prompt(v):
    return isinstance(v, str) or (isinstance(v, list) and v != [] and all(map(is_int, v)))


def is_messages(v):
    return isinstance(v, list) and v != []


# name: (default, check, what the check wants); null means the default
PARAMS = {
    "model": (None, lambda v: isinstance(v, str), "a string"),
    "max_tokens": (-1, lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (0.8, lambda v: is_num(v) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (0.95, lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (40, lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "min_p": (0.05, lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (None, lambda v: is_int(v) and 0 <= v < 2**63, "an integer in [0, 2^63)"),
    "stop": ([], is_stop, f"a non-empty string or a list of up to {MAX_STOPS} of them"),
    "n": (1, lambda v: is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]"),
    "ignore_eos": (False, lambda v: isinstance(v, bool), "a boolean"),
    "presence_penalty": (0.0, lambda v: is_num(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (0.0, lambda v: is_num(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "repeat_penalty": (1.0, lambda v: is_num(v) and 0 < v <= 10, "a number in (0, 10]"),
    "stream": (False, lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": ({}, is_stream_options, 'an object {"include_usage": boolean}'),
    "user": (None, lambda v: isinstance(v, str), "a string"),
}
COMPLETION_PARAMS = dict(PARAMS, prompt=(None, is_prompt, "a string or a list of token ids"))
CHAT_PARAMS = dict(PARAMS, messages=(None, is_messages, "a non-empty list of messages"),
                   max_completion_tokens=PARAMS["max_tokens"])
TOKENIZE_PARAMS = {"content": (None, lambda v: isinstance(v, str), "a string"),
                   "add_special": (False, lambda v: isinstance(v, bool), "a boolean"),
                   "parse_special": (True, lambda v: isinstance(v, bool), "a boolean")}
TEMPLATE_PARAMS = {"messages": (None, is_messages, "a non-empty list of messages")}
DETOKENIZE_PARAMS = {"tokens": (None, lambda v: isinstance(v, list) and all(map(is_int, v)),
                                "a list of token ids")}


async def read_params(request, spec, required):
    """The request's JSON object checked against spec, defaults filled in."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_json")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise APIError(400, f"unknown parameter: {unknown[0]}", "unknown_parameter", unknown[0])
    params = {}
    for name, (default, check, wants) in spec.items():
        v = body.get(name)
        if v is None:
            if name in required:
                raise APIError(400, f"missing required parameter: {name}", "missing_parameter", name)
            v = default
        elif not check(v):
            raise APIError(400, f"{name} must be {wants}, got {json.dumps(v)[:80]}",
                           "invalid_value", name)
        params[name] = v
    return params


# ---- text of a choice ----

class Choice:
    """One engine request's output as text: whole UTF-8 characters only, and
    held back while its end could still grow into a stop string."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.n_tokens = 0
        self.finish_reason = None

    def add(self, token):
        """Take one token; True when the text reached a stop string (then cut before it)."""
        self.n_tokens += 1
        start = max(0, len(self.text) - max(map(len, self.stops), default=0) + 1)
        self.text += self.decoder.decode(self.tokenizer.piece_bytes(token))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
        return bool(hits)

    def end(self, reason):
        self.text += self.decoder.decode(b"", final=True)
        self.finish_reason = reason

    def take(self):
        """The text that is final and not given out yet."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((k for s in self.stops for k in range(1, len(s))
                        if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


class ClientGone(Exception):
    pass


class Job:
    """The n engine requests of one HTTP request; their tokens and endings
    arrive on the event loop's queue as (choice index, token or None)."""

    def __init__(self, service, prompt, p):
        self.service, self.prompt = service, prompt
        self.events = asyncio.Queue()
        tok = service.model.tokenizer
        stops = [p["stop"]] if isinstance(p["stop"], str) else p["stop"]
        self.choices = [Choice(tok, stops) for _ in range(p["n"])]
        loop = asyncio.get_running_loop()
        self.requests = []
        for i in range(p["n"]):
            sampler = Sampler(temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                              min_p=p["min_p"], repeat_penalty=p["repeat_penalty"],
                              presence_penalty=p["presence_penalty"],
                              frequency_penalty=p["frequency_penalty"],
                              seed=None if p["seed"] is None else p["seed"] + i)
            self.requests.append(service.engine.submit(
                prompt, p["max_tokens"], sampler, ignore_eos=p["ignore_eos"],
                on_token=lambda r, t, i=i: loop.call_soon_threadsafe(self.events.put_nowait, (i, t)),
                on_done=lambda r, i=i: loop.call_soon_threadsafe(self.done, i)))
            service.in_flight += 1

    def done(self, i):
        self.service.in_flight -= 1
        self.events.put_nowait((i, None))

    def cancel(self):
        for r in self.requests:
            if r.finish_reason is None:
                self.service.engine.cancel(r)

    async def updates(self, request):
        """Yields (choice index, new text) as tokens arrive, until every choice
        has finished; ClientGone when the client disconnects."""
        timeout = self.service.args.timeout
        deadline = time.monotonic() + timeout
        while any(c.finish_reason is None for c in self.choices):
            try:
                i, token = await asyncio.wait_for(self.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None
                if time.monotonic() > deadline:
                    raise APIError(503, f"no token came within {timeout:g} s (--timeout)",
                                   "timeout") from None
                continue
            deadline = time.monotonic() + timeout
            c, r = self.choices[i], self.requests[i]
            if c.finish_reason is not None:
                continue                    # the engine's last words after a stop string
            if token is None:
                if isinstance(r.error, APIError):     # a replica's failure (kvcells.replicas)
                    raise r.error
                if r.finish_reason == "error":
                    raise APIError(500, f"generation failed: {r.error}", "internal_error")
                c.end(r.finish_reason)
            elif c.add(token):
                self.service.engine.cancel(r)
            yield i, c.take()

    def usage(self):
        n_prompt = len(self.prompt)
        n_gen = sum(c.n_tokens for c in self.choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": self.requests[0].cached_tokens}}


# ---- the service behind the routes ----

class Service:
    def __init__(self, args):
        self.args = args
        self.model = self.engine = self.template = None
        self.template_error = None
        self.model_name = None
        self.ready = False
        self.load_error = None
        self.on_load_error = None            # called (from the loading thread) when loading fails
        self.in_flight = 0                   # engine requests submitted and not done
        self.stopping = threading.Event()
        self.asks = queue.SimpleQueue()
        self.threads = []
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models),
                  Route("/health", self.health),
                  Route("/metrics", self.metrics),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"]),
                  Route("/apply-template", self.apply_template, methods=["POST"]),
                  Route("/slots", self.slots)]
        middleware = [Middleware(BearerAuth, key=args.api_key)] if args.api_key else []
        self.app = Starlette(routes=routes, middleware=middleware, lifespan=self.lifespan,
                             exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                 ClientGone: on_client_gone,
                                                 ChatTemplateError: on_chat_template_error,
                                                 Exception: on_internal_error})

    # ---- life ----

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loader = threading.Thread(target=self.load, name="kvcells-load", daemon=True)
        loader.start()
        self.threads.append(loader)
        yield
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=SHUTDOWN_GRACE_S)

    def load(self):
        a = self.args
        try:
            path = a.model or default_model_path()
            t0 = time.perf_counter()
            self.model = Model.load(path)
            self.model_name = os.path.basename(path)
            self.load_template()
            ctx = Context(self.model, n_ctx=a.ctx_size, n_seq_max=a.parallel + SPARE_SEQ_IDS,
                          n_ubatch=a.ubatch_size, type_k=a.cache_type_k, type_v=a.cache_type_v,
                          n_threads=a.threads)
            self.engine = Engine(ctx, a.parallel, prefix_cache=not a.no_prefix_cache,
                                 lookup=not a.no_lookup)
        except (Exception, SystemExit) as e:
            log.error("loading failed: %s", e)
            self.load_error = e
            if self.on_load_error:
                self.on_load_error()
            return
        log.info("model %s (%s) loaded in %.2f s; %d slots, %d KV cells (%s/%s), prefix cache %s, "
                 "prompt lookup %s", path, self.model.arch, time.perf_counter() - t0, a.parallel,
                 a.ctx_size, a.cache_type_k, a.cache_type_v, "off" if a.no_prefix_cache else "on",
                 "off" if a.no_lookup else "on")
        runner = threading.Thread(target=self.run_engine, name="kvcells-engine", daemon=True)
        runner.start()
        self.threads.append(runner)
        self.ready = True

    def load_template(self):
        a = self.args
        try:
            self.template = ChatTemplate.for_model(self.model, a.chat_template, a.chat_template_file)
            log.info("chat template: %s", self.template.name)
        except ChatTemplateError as e:
            if a.chat_template or a.chat_template_file:
                raise
            self.template_error = str(e)
            log.info("chat template: none (%s)", e)

    def run_engine(self):
        while not self.stopping.is_set():
            self.answer_asks()
            try:
                busy = self.engine.step()
            except Exception:           # the engine fails requests, not steps; a bug must not stop serving
                log.exception("engine step failed")
                busy = False
            if not busy:
                self.engine.wait_for_work(0.05)

    def answer_asks(self):
        while not self.asks.empty():
            fn, loop, fut = self.asks.get()
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            loop.call_soon_threadsafe(settle, fut, result, error)

    async def on_engine_thread(self, fn):
        """fn() run on the engine thread between two steps."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.asks.put((fn, loop, fut))
        return await fut

    def check_ready(self):
        if not self.ready:
            raise APIError(503, "the model is loading", "loading")

    # ---- completions ----

    async def completions(self, request):
        return await self.complete(request, chat=False)

    async def chat_completions(self, request):
        return await self.complete(request, chat=True)

    async def complete(self, request, chat):
        self.check_ready()
        p = await read_params(request, CHAT_PARAMS if chat else COMPLETION_PARAMS,
                              ("messages",) if chat else ("prompt",))
        if chat and p["max_completion_tokens"] != -1:
            p["max_tokens"] = p["max_completion_tokens"]
        if p["stream_options"] and not p["stream"]:
            raise APIError(400, "stream_options needs stream: true", "invalid_value", "stream_options")
        prompt = self.prompt_ids(p, chat)
        if len(prompt) > self.engine.ctx.n_ctx:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context holds "
                           f"{self.engine.ctx.n_ctx} (-c)", "context_length_exceeded")
        waiting = self.in_flight + p["n"] - self.args.parallel
        if waiting > self.args.max_waiting:
            raise APIError(503, f"the server is busy: {self.args.max_waiting} requests are "
                           f"already waiting (--max-waiting)", "server_busy")
        try:
            job = Job(self, prompt, p)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_value", "prompt") from None
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "created": int(time.time()), "model": self.model_name}
        if p["stream"]:
            usage = p["stream_options"].get("include_usage", False)
            return StreamingResponse(self.stream(job, request, head, chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _ in job.updates(request):
                pass
        finally:
            job.cancel()
        choices = [{"index": i, "logprobs": None, "finish_reason": c.finish_reason,
                    **({"message": {"role": "assistant", "content": c.text}} if chat
                       else {"text": c.text})}
                   for i, c in enumerate(job.choices)]
        return JSONResponse(dict(head, object="chat.completion" if chat else "text_completion",
                                 choices=choices, usage=job.usage()))

    def prompt_ids(self, p, chat):
        tok = self.model.tokenizer
        if chat:
            return self.chat_template().encode(tok, p["messages"])
        if isinstance(p["prompt"], str):
            return tok.encode(p["prompt"], add_bos=True, special=True)
        return p["prompt"]

    def chat_template(self):
        if self.template is None:
            raise APIError(400, self.template_error, "no_chat_template")
        return self.template

    async def stream(self, job, request, head, chat, include_usage):
        """Server-Sent Events: a chunk per piece of text, one with each
        choice's finish_reason, the usage if asked, then [DONE]."""
        head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        extra = {"usage": None} if include_usage else {}

        def chunk(i, text, finish_reason=None, delta=None):
            choice = {"index": i, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
            else:
                choice["text"] = text
            return sse(dict(head, choices=[choice], **extra))

        try:
            if chat:
                for i in range(len(job.choices)):
                    yield chunk(i, "", delta={"role": "assistant", "content": ""})
            async for i, text in job.updates(request):
                if text:
                    yield chunk(i, text)
                if job.choices[i].finish_reason is not None:
                    yield chunk(i, "", job.choices[i].finish_reason)
            if include_usage:
                yield sse(dict(head, choices=[], usage=job.usage()))
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield sse(e.body())
        except ClientGone:
            pass
        finally:
            job.cancel()

    # ---- the rest ----

    async def health(self, request):
        if self.load_error is not None:
            return APIError(503, f"loading failed: {self.load_error}", "load_failed").response()
        self.check_ready()
        return JSONResponse({"status": "ok"})

    async def models(self, request):
        self.check_ready()
        hp = self.model.hparams
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "kvcells",
            "meta": {"arch": self.model.arch, "n_vocab": hp.n_vocab, "n_ctx": self.engine.ctx.n_ctx,
                     "chat_template": self.template.name if self.template else None}}]})

    async def tokenize(self, request):
        self.check_ready()
        p = await read_params(request, TOKENIZE_PARAMS, ("content",))
        ids = self.model.tokenizer.encode(p["content"], add_bos=p["add_special"],
                                          special=p["parse_special"])
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request):
        self.check_ready()
        p = await read_params(request, DETOKENIZE_PARAMS, ("tokens",))
        try:
            return JSONResponse({"content": self.model.tokenizer.decode(p["tokens"])})
        except ValueError as e:
            raise APIError(400, str(e), "invalid_value", "tokens") from None

    async def apply_template(self, request):
        """The prompt text a chat request renders to."""
        self.check_ready()
        p = await read_params(request, TEMPLATE_PARAMS, ("messages",))
        return JSONResponse({"prompt": self.chat_template().render(p["messages"])})

    async def slots(self, request):
        self.check_ready()
        running = await self.on_engine_thread(lambda: [
            (seq, len(r.prompt), r.cached_tokens, len(r.tokens))
            for seq, r in self.engine.running.items()])
        out = [{"id": k, "is_processing": False} for k in range(self.args.parallel)]
        for k, (seq, n_prompt, n_cached, n_decoded) in enumerate(running):
            out[k].update(is_processing=True, seq_id=seq, n_prompt_tokens=n_prompt,
                          n_cached_tokens=n_cached, n_decoded=n_decoded)
        return JSONResponse(out)

    async def metrics(self, request):
        self.check_ready()
        stats = self.engine.stats()
        lines = []
        for key, name, kind, help_text in METRICS:
            lines += [f"# HELP kvcells_{name} {help_text}", f"# TYPE kvcells_{name} {kind}",
                      f"kvcells_{name} {stats[key]}"]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


METRICS = [
    ("prompt_tokens", "prompt_tokens_total", "counter", "Prompt tokens of admitted requests."),
    ("cached_tokens", "prompt_tokens_cached_total", "counter",
     "Prompt tokens served from the prefix cache."),
    ("generated_tokens", "generated_tokens_total", "counter", "Tokens generated."),
    ("running", "requests_running", "gauge", "Requests decoding in a slot."),
    ("waiting", "requests_waiting", "gauge", "Requests waiting for a slot."),
    ("cells_used", "kv_cells_used", "gauge", "KV cells holding a token."),
    ("cells_total", "kv_cells_total", "gauge", "KV cells in the cache."),
    ("idle_cells", "kv_cells_idle", "gauge", "KV cells held only by cached prefixes."),
    ("evictions", "evictions_total", "counter", "Cached prefixes evicted for room."),
    ("draft_tokens", "draft_tokens_total", "counter", "Tokens drafted by prompt lookup."),
    ("accepted_draft_tokens", "draft_tokens_accepted_total", "counter",
     "Drafted tokens the sampler accepted."),
]


def settle(fut, result, error):
    if not fut.done():
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replicas > 1:
        from .replicas import main as serve_replicas
        return serve_replicas(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    service = Service(args)
    server = uvicorn.Server(uvicorn.Config(service.app, host=args.host, port=args.port,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    service.on_load_error = lambda: setattr(server, "should_exit", True)
    # uvicorn drains the requests in flight, then raises SIGTERM again: exit 0 then
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    if service.load_error is not None:
        raise SystemExit(f"kvcells-server: {service.load_error}")


if __name__ == "__main__":
    main()

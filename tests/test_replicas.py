"""kvcells-server --replicas on a local Ray cluster (127.0.0.1, 2 CPUs,
100 MB object store), started and shut down by this module."""
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.util import list_named_actors  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from kvcells.replicas import APP_NAME, build_app  # noqa: E402
from kvcells.server import Service, parse_args  # noqa: E402

TIMEOUT = 20            # the server's --timeout: seconds without a token before a 503
CLIENT_TIMEOUT = TIMEOUT + 15


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return str(tiny_gguf("llama"))


def sys_args(model):
    return ["-m", model, "-c", "320", "-np", "1", "-t", "1", "--replicas", "2",
            "--replica-cpus", "0.5", "--timeout", str(TIMEOUT)]


def server_args(model):
    return parse_args(sys_args(model))


@pytest.fixture(scope="module")
def cluster():
    """(base URL, Ray address) of a fresh local cluster; Ray Serve's HTTP
    proxy listens on that URL once something is deployed."""
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        yield f"http://127.0.0.1:{free_port()}", ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


DEPLOYED = {}


def deploy(cluster, model, prefix_affinity=True, fresh=True):
    """Fresh replicas (empty caches) of the app; fresh=False keeps the app
    the last call deployed with the same routing."""
    if not fresh and DEPLOYED.get("prefix_affinity") == prefix_affinity and serve.status(
            ).applications.get(APP_NAME):
        return
    DEPLOYED["prefix_affinity"] = prefix_affinity
    serve.start(http_options={"host": "127.0.0.1", "port": int(cluster[0].rsplit(":", 1)[1])})
    serve.delete(APP_NAME)
    serve.run(build_app(server_args(model), prefix_affinity=prefix_affinity),
              name=APP_NAME, route_prefix="/")


def replica_pids():
    """Process ids of the live EngineReplica actors."""
    pids = []
    for a in list_named_actors(all_namespaces=True):
        if "EngineReplica" in a["name"]:
            try:
                actor = ray.get_actor(a["name"], namespace=a["namespace"])
                pids.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
            except (ValueError, ray.exceptions.RayError):
                pass                        # gone between the listing and the call
    return pids


@pytest.fixture(scope="module")
def single(model):
    """The single-process server on the same model, in this process."""
    args = server_args(model)
    args.replicas = 1
    with TestClient(Service(args).app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the single-process server did not load"
            time.sleep(0.1)
        yield client


COMPARED = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": [5, 17, 42, 9, 31], "max_tokens": 10, "ignore_eos": True,
                         "temperature": 0}),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 8, "temperature": 0.9, "seed": 7,
                         "n": 2, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "a b c", "max_tokens": 16, "stop": ["e"], "temperature": 0}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": [10 ** 6]}),
    ("/v1/completions", {"prompt": "x" * 2000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                              "temperature": 0}),
]


def without_ids(body):
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_kvcells_server_replicas_answers_like_the_single_process_server(cluster, model, single,
                                                                         tmp_path):
    """The command itself, joining the cluster at RAY_ADDRESS."""
    url, address = cluster
    port = url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "kvcells.server", *sys_args(model), "--port", port]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_ADDRESS=address),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "kvcells-server --replicas exited:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "kvcells-server --replicas did not come up"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as http:
            compare_with_single(http, single)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            proc.kill()


def compare_with_single(http, single):
    for path, body in COMPARED:
        want, got = single.post(path, json=body), http.post(path, json=body)
        assert got.status_code == want.status_code, (body, got.text)
        if want.status_code == 200:
            want, got = without_ids(want.json()), without_ids(got.json())
            # cached prompt tokens depend on what each engine served before
            for u in (want["usage"], got["usage"]):
                del u["prompt_tokens_details"]
        else:
            want, got = want.json(), got.json()
        assert got == want, body
    stream = dict(COMPARED[2][1], stream=True)
    want = sse_choices(single.post("/v1/completions", json=stream).text)
    got = sse_choices(http.post("/v1/completions", json=stream).text)
    assert got == want and len(want) == 2


def sse_choices(text):
    """Each choice's streamed text and finish reason (choices interleave by timing)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for c in json.loads(line[len("data: "):])["choices"]:
                text, reason = out.get(c["index"], ("", None))
                out[c["index"]] = (text + c["text"], c["finish_reason"] or reason)
    return out


def prefix_workload(seed=0, n_prefixes=4, per_prefix=10, prefix_len=100, suffix_len=6):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 256) for _ in range(prefix_len)] for _ in range(n_prefixes)]
    prompts = [p + [rng.randrange(3, 256) for _ in range(suffix_len)]
               for p in prefixes for _ in range(per_prefix)]
    rng.shuffle(prompts)
    return prompts


def ideal_cached(prompts):
    """Prompt tokens one engine with room for everything would take from its
    cache: each prompt's longest common start with an earlier prompt (the
    last prompt token is always computed)."""
    total = 0
    for k, p in enumerate(prompts):
        best = 0
        for q in prompts[:k]:
            n = 0
            while n < min(len(p) - 1, len(q)) and p[n] == q[n]:
                n += 1
            best = max(best, n)
        total += best
    return total


def served_from_cache(base_url, prompts):
    with httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT) as http:
        total = 0
        for p in prompts:
            r = http.post("/v1/completions", json={"prompt": p, "max_tokens": 4, "ignore_eos": True,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            total += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return total


def test_prefix_affinity_keeps_prefixes_cached(cluster, model):
    prompts = prefix_workload()
    ideal = ideal_cached(prompts)
    deploy(cluster, model, prefix_affinity=False)
    blind = served_from_cache(cluster[0], prompts)
    deploy(cluster, model, prefix_affinity=True)
    affinity = served_from_cache(cluster[0], prompts)
    print(f"\nprompt tokens from cache, 4 prefixes x 10 requests on 2 replicas: one engine "
          f"{ideal}, prefix affinity {affinity} ({affinity / ideal:.0%}), Ray Serve's "
          f"default router {blind} ({blind / ideal:.0%})")
    assert affinity >= 0.8 * ideal
    assert blind < affinity - 0.15 * ideal


def test_a_killed_replica_fails_its_requests_with_503_and_service_goes_on(cluster, model):
    deploy(cluster, model, fresh=False)
    prompts = [p[:20] for p in prefix_workload(seed=1, per_prefix=2)]
    body = {"max_tokens": 250, "ignore_eos": True, "temperature": 0}
    decoding = threading.Semaphore(0)

    def complete(prompt, stream):
        """(outcome, seconds): "ok", or the error code of an HTTP error or a stream's error event."""
        t0 = time.monotonic()
        with httpx.Client(base_url=cluster[0], timeout=CLIENT_TIMEOUT) as http:
            if not stream:
                r = http.post("/v1/completions", json=dict(body, prompt=prompt))
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
                return ("ok" if ok else f"{r.status_code} {r.json()['error']['code']}",
                        time.monotonic() - t0)
            events = []
            with http.stream("POST", "/v1/completions", json=dict(body, prompt=prompt, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[len("data: "):]))
                        if len(events) == 1:
                            decoding.release()
        last = events[-1]
        outcome = (f"stream {last['error']['code']}" if "error" in last else
                   "ok" if last["choices"][0]["finish_reason"] == "length" else repr(last))
        return outcome, time.monotonic() - t0

    victim = replica_pids()[0]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, p, k % 2 == 0) for k, p in enumerate(prompts)]
        # with one slot per replica, two streams decoding at once are on both replicas
        for _ in range(2):
            assert decoding.acquire(timeout=CLIENT_TIMEOUT)
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]
    print("\noutcomes after killing a replica mid-load:", results)
    outcomes = [o for o, _ in results]
    assert all(t < TIMEOUT + 10 for _, t in results)
    assert set(outcomes) <= {"ok", "503 replica_failed", "stream replica_failed"}
    assert "ok" in outcomes and set(outcomes) != {"ok"}
    # new requests are served, and Ray Serve brings the replica count back to 2
    for p in prompts:
        assert complete(p, stream=False)[0] == "ok"
    deadline = time.monotonic() + 60
    while len(replica_pids()) < 2 or victim in replica_pids():
        assert time.monotonic() < deadline, "the dead replica was not replaced"
        time.sleep(1)

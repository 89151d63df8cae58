"""kvcells-server --replicas N: N engines on Ray Serve behind one HTTP port.

Two deployments (docs/scaling.md has the picture):
  Ingress        the server's own Starlette app (kvcells.server.Service) with
                 its routes, validation and errors; it renders and tokenizes
                 the prompt, and its engine is a RemoteEngine that hands each
                 request to an EngineReplica through a Ray Serve handle.
  EngineReplica  one engine each (model, KV cache, prefix cache, slots), run
                 by a Service of its own as in the single-process server;
                 streams the tokens back.
The handle picks the replica with PrefixAffinityRouter, a Ray Serve request
router over kvcells.routing.PrefixAffinity: it sees the prompt's token ids, so
requests sharing their first tokens go to the replica that has them cached.
"""
import asyncio
import copy
import logging
import os
import signal
import threading

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.request_router import FIFOMixin, RequestRouter

from .routing import PrefixAffinity, prefix_key
from .server import APIError, Service

log = logging.getLogger("kvcells.replicas")

APP_NAME = "kvcells"
OVERLOAD_THRESHOLD = 4      # queue length difference past which a prefix's owner is passed over


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: the replica owning the prompt's prefix key,
    unless its queue is OVERLOAD_THRESHOLD longer than the shortest.

    FIFOMixin: without it Ray Serve matches a chosen replica to its request by
    the request id, which the n choices of one HTTP request share."""

    def initialize_state(self, threshold=OVERLOAD_THRESHOLD):
        self.affinity = PrefixAffinity(threshold)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not pending_request.args:
            return [candidate_replicas]
        key = prefix_key(pending_request.args[0])
        cache = self.replica_queue_len_cache
        order = self.affinity.choose(key, {r.replica_id: cache.get(r.replica_id)
                                           for r in candidate_replicas})
        by_id = {r.replica_id: r for r in candidate_replicas}
        # the first choice, then the others (Ray Serve takes the shortest queue among them)
        return [[by_id[order[0]]], [by_id[i] for i in order[1:]]]

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id)


@serve.deployment
class EngineReplica:
    """One engine, loaded and stepped by a Service as in kvcells-server."""

    def __init__(self, args):
        self.service = Service(args)
        self.service.load()
        if self.service.load_error is not None:
            raise RuntimeError(f"loading failed: {self.service.load_error}")

    async def generate(self, prompt, max_tokens, sampler, ignore_eos):
        """Yields the generated token ids, then {finish_reason, cached_tokens, error}."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        engine = self.service.engine
        r = engine.submit(prompt, max_tokens, sampler, ignore_eos=ignore_eos,
                          on_token=lambda r, t: loop.call_soon_threadsafe(events.put_nowait, t),
                          on_done=lambda r: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            while (token := await events.get()) is not None:
                yield token
            yield {"finish_reason": r.finish_reason, "cached_tokens": r.cached_tokens,
                   "error": None if r.error is None else str(r.error)}
        finally:
            if r.finish_reason is None:     # the ingress cancelled: its client left or a stop string came
                engine.cancel(r)


class RemoteRequest:
    """What a Job reads of an engine request, filled in from a replica's stream."""

    def __init__(self, prompt):
        self.prompt = prompt
        self.tokens = []
        self.cached_tokens = 0
        self.finish_reason = None
        self.error = None
        self.task = None


class RemoteEngine:
    """The engine entry points the server's handlers use (submit, cancel),
    served by the EngineReplica deployment through a handle."""

    def __init__(self, handle, n_ctx, n_vocab):
        self.handle = handle.options(stream=True)
        self.ctx = _ContextSize(n_ctx, n_vocab)

    def submit(self, prompt_ids, max_tokens, sampler=None, *, ignore_eos=False,
               on_token=None, on_done=None):
        prompt = [int(t) for t in prompt_ids]
        if not all(0 <= t < self.ctx.n_vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {self.ctx.n_vocab})")
        r = RemoteRequest(prompt)
        r.task = asyncio.get_running_loop().create_task(
            self._run(r, max_tokens, sampler, ignore_eos, on_token, on_done))
        return r

    def cancel(self, r):
        if r.finish_reason is None:
            r.task.cancel()

    async def _run(self, r, max_tokens, sampler, ignore_eos, on_token, on_done):
        try:
            async for event in self.handle.generate.remote(r.prompt, max_tokens, sampler, ignore_eos):
                if isinstance(event, dict):
                    r.cached_tokens, r.error = event["cached_tokens"], event["error"]
                    r.finish_reason = event["finish_reason"]
                else:
                    r.tokens.append(event)
                    on_token(r, event)
        except asyncio.CancelledError:
            r.finish_reason = "cancelled"
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as e:
            log.warning("replica failed: %s", e)
            r.finish_reason = "error"
            r.error = APIError(503, "the engine replica serving this request failed; retry "
                               f"({type(e).__name__})", "replica_failed")
        except Exception as e:
            log.exception("replica call failed")
            r.finish_reason, r.error = "error", e
        if r.finish_reason is None:
            r.finish_reason, r.error = "error", RuntimeError("the replica's stream ended early")
        on_done(r)


class _ContextSize:
    def __init__(self, n_ctx, n_vocab):
        self.n_ctx, self.n_vocab = n_ctx, n_vocab


class IngressService(Service):
    """The server's app with a RemoteEngine: it loads the model for its
    tokenizer and chat template only, before the app starts."""

    def __init__(self, args, replica_handle):
        args = copy.copy(args)
        args.parallel *= args.replicas          # slots over all replicas, for --max-waiting
        super().__init__(args)
        from .cli import default_model_path
        from .model import Model
        path = args.model or default_model_path()
        self.model = Model.load(path)
        self.model_name = os.path.basename(path)
        self.load_template()
        self.engine = RemoteEngine(replica_handle, args.ctx_size, self.model.hparams.n_vocab)
        self.ready = True

    async def lifespan(self, app):
        yield

    async def slots(self, request):
        raise APIError(404, "/slots is per engine; with --replicas see the Ray dashboard",
                       "not_found")

    async def metrics(self, request):
        raise APIError(404, "/metrics is per engine; with --replicas see Ray Serve's metrics",
                       "not_found")


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, args, replica_handle):
        self.service = IngressService(args, replica_handle)

    def __serve_build_asgi_app__(self):
        return self.service.app


def build_app(args, prefix_affinity=True):
    """The Ray Serve application: an Ingress over args.replicas EngineReplicas.
    prefix_affinity=False leaves routing to Ray Serve's default router."""
    options = dict(num_replicas=args.replicas,
                   ray_actor_options={"num_cpus": args.replica_cpus},
                   max_ongoing_requests=args.parallel + args.max_waiting)
    if prefix_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter)
    replica = EngineReplica.options(**options).bind(args)
    return Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=100_000).bind(args, replica)


def main(args):
    """Serve until SIGTERM or Ctrl-C: join the cluster at RAY_ADDRESS, or start a local one."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray.init()      # RAY_ADDRESS, when set, names the cluster to join
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):     # after ray.init, which sets its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        log.info("%d replicas serving on http://%s:%d", args.replicas, args.host, args.port)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    log.info("stopped")

"""Simulated prefix-cache hit rate of N engine replicas behind one router.

Each request is one of P shared prefixes (a system prompt of --prefix-len
tokens) followed by a suffix of its own. A replica serves one request at a
time, first come first served, and keeps the last --cache prefixes it saw
(least recently used goes first, like the engine's idle sequences). A request
whose prefix its replica holds prefills only its suffix.

Routers compared:
  round-robin   replica i mod N
  affinity      kvcells.routing.PrefixAffinity without its overload guard: a
                new prefix goes to the replica owning the fewest, then stays
  affinity+gd   the same with the guard: the least-loaded replica when the
                owner's queue is more than --threshold requests longer

Printed: the hit rate (prompt tokens served from cache / all prompt tokens)
for each router over replicas x prefixes with uniform prefix popularity, then
a skewed workload (Zipf popularity) with the hit rate and the 95th percentile
latency, where the guard matters.

    python tools/sim_routing.py [--requests 4000] [--seed 0]
"""
import argparse
import collections
import random

from kvcells.routing import PrefixAffinity

ROUTERS = ("round-robin", "affinity", "affinity+gd")


def workload(n_requests, n_prefixes, rate, zipf, rng):
    """(arrival time, prefix id) pairs: Poisson arrivals, uniform or Zipf popularity."""
    weights = [1 / (k + 1) ** zipf for k in range(n_prefixes)]
    t, out = 0.0, []
    for p in rng.choices(range(n_prefixes), weights, k=n_requests):
        t += rng.expovariate(rate)
        out.append((t, p))
    return out


def simulate(router, n_replicas, requests, args):
    """(hit rate, p95 latency) of one router on one workload."""
    busy_until = [0.0] * n_replicas
    pending = [collections.deque() for _ in range(n_replicas)]   # finish times not yet past
    caches = [collections.OrderedDict() for _ in range(n_replicas)]
    prompt_len = args.prefix_len + args.suffix_len
    affinity = PrefixAffinity(threshold=args.threshold if router == "affinity+gd" else float("inf"))
    cached = 0
    latencies = []
    for k, (t, p) in enumerate(requests):
        for q in pending:
            while q and q[0] <= t:
                q.popleft()
        queue = [len(q) for q in pending]
        if router == "round-robin":
            r = k % n_replicas
        else:
            r = affinity.choose(p, dict(enumerate(queue)))[0]
        cache = caches[r]
        hit = p in cache
        if hit:
            cache.move_to_end(p)
            cached += args.prefix_len
        else:
            cache[p] = True
            if len(cache) > args.cache:
                cache.popitem(last=False)
        work = (prompt_len - (args.prefix_len if hit else 0)) * args.prefill_cost + args.gen_len
        start = max(t, busy_until[r])
        busy_until[r] = start + work
        pending[r].append(busy_until[r])
        latencies.append(busy_until[r] - t)
    latencies.sort()
    return cached / (prompt_len * len(requests)), latencies[int(0.95 * len(latencies))]


def arrival_rate(n_replicas, args):
    """Requests per time unit that keep the replicas --load busy if every
    prefix were cached (1 time unit = one generated token)."""
    cached_work = args.suffix_len * args.prefill_cost + args.gen_len
    return args.load * n_replicas / cached_work


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--replicas", default="1,2,4,8")
    ap.add_argument("--prefixes", default="1,4,16,64")
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--suffix-len", type=int, default=50)
    ap.add_argument("--gen-len", type=int, default=100)
    ap.add_argument("--prefill-cost", type=float, default=0.1,
                    help="time of one prompt token relative to one generated token")
    ap.add_argument("--cache", type=int, default=8, help="prefixes one replica keeps")
    ap.add_argument("--threshold", type=int, default=4, help="overload guard, in requests")
    ap.add_argument("--load", type=float, default=0.6)
    ap.add_argument("--zipf", type=float, default=1.2, help="popularity skew of the second table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    replicas = [int(x) for x in args.replicas.split(",")]
    prefixes = [int(x) for x in args.prefixes.split(",")]

    print(f"hit rate (prompt tokens from cache), uniform popularity; prompt = "
          f"{args.prefix_len} shared + {args.suffix_len} own tokens, {args.cache} prefixes "
          f"cached per replica, load {args.load}")
    print("replicas  router       " + "".join(f"{p:>9} pfx" for p in prefixes))
    for n in replicas:
        for router in ROUTERS:
            row = []
            for p in prefixes:
                reqs = workload(args.requests, p, arrival_rate(n, args), 0.0,
                                random.Random(args.seed))
                row.append(simulate(router, n, reqs, args)[0])
            print(f"{n:>8}  {router:<12} " + "".join(f"{h:>13.1%}" for h in row))

    n, p = max(replicas), max(prefixes)
    print(f"\nskewed popularity (Zipf {args.zipf}), {n} replicas, {p} prefixes, "
          f"guard threshold {args.threshold}")
    print("router         hit rate   p95 latency")
    reqs = workload(args.requests, p, arrival_rate(n, args), args.zipf, random.Random(args.seed))
    for router in ROUTERS:
        hit, p95 = simulate(router, n, reqs, args)
        print(f"{router:<12} {hit:>10.1%} {p95:>13.0f}")


if __name__ == "__main__":
    main()

"""Prefix affinity: which replica a prompt goes to, so shared prefixes stay cached.

A prompt's key is a hash of its first KEY_TOKENS token ids (of the rendered
prompt, so a chat's template and system prompt are in it). The first time a
key is seen it is given to the live replica that owns the fewest keys; after
that its requests go to that replica, whose prefix cache holds the tokens.
When the owner's queue is longer than the shortest queue by more than
`threshold` requests, the request goes to the least-loaded replica instead
(the key keeps its owner). A key whose owner is gone gets a new one.

Plain Python with no Ray in it: kvcells.replicas wraps it in a Ray Serve
request router, and tools/sim_routing.py simulates it.
"""
import collections
import hashlib

KEY_TOKENS = 64


def prefix_key(token_ids, n=KEY_TOKENS):
    """A stable hash of the first n token ids (the same in every process)."""
    data = b"".join(int(t).to_bytes(4, "little") for t in token_ids[:n])
    return hashlib.blake2b(data, digest_size=16).digest()


class PrefixAffinity:
    def __init__(self, threshold=4, max_keys=65536):
        self.threshold = threshold
        self.max_keys = max_keys
        self.owner = collections.OrderedDict()    # key -> replica, least recently used first
        self.n_keys = collections.Counter()       # replica -> keys it owns

    def choose(self, key, queue_lens):
        """Replicas in order of preference for a prompt with this key.

        queue_lens maps every live replica to its queue length, or None when
        it is not known (such a replica is left out of the overload guard)."""
        if not queue_lens:
            raise ValueError("no live replica to choose from")
        owner = self.owner.get(key)
        if owner not in queue_lens:
            owner = min(queue_lens, key=lambda r: (self.n_keys[r], queue_lens[r] or 0))
            self._assign(key, owner)
        self.owner.move_to_end(key)
        known = {r: q for r, q in queue_lens.items() if q is not None}
        others = sorted((r for r in queue_lens if r != owner), key=lambda r: queue_lens[r] or 0)
        if owner in known and others and known[owner] - min(known.values()) > self.threshold:
            return others + [owner]
        return [owner] + others

    def forget(self, replica):
        """Drop a dead replica's keys: they go to live replicas when next seen."""
        for key in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[key]
        del self.n_keys[replica]

    def _assign(self, key, replica):
        old = self.owner.pop(key, None)
        if old is not None:
            self.n_keys[old] -= 1
        self.owner[key] = replica
        self.n_keys[replica] += 1
        if len(self.owner) > self.max_keys:
            _, evicted = self.owner.popitem(last=False)
            self.n_keys[evicted] -= 1

"""SentencePiece-style tokenizer from GGUF metadata (`tokenizer.ggml.model == "llama"`).

Gives llama.cpp's `llama_tokenize` / `llama_detokenize` results for the same
vocab and flags:

1. Special tokens written in the text are cut out first, longest first
   (user-defined tokens always; control and unknown ones only when
   `special=True`).
2. Each remaining fragment gets spaces replaced by U+2581 (and a leading
   space when the vocab asks for `add_space_prefix` and the fragment follows
   the start or a special token), then is merged bigram by bigram, best score
   first, ties to the leftmost pair; characters that end up in no token fall
   back to byte tokens.

Speed: a fragment is cut into chunks before every U+2581 whose left neighbour
never precedes U+2581 inside a vocab piece. No merge can cross such a cut
(every merge result is a vocab piece), so merging the chunks one by one gives
exactly the merges of the whole fragment, and a chunk's ids can be cached.
"""
import heapq
import itertools
import operator
import re

from .errors import GGUFError

# llama.cpp token attributes (llama_token_attr) and GGUF token types.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1
ATTR_UNUSED = 2
ATTR_NORMAL = 4
ATTR_CONTROL = 8
ATTR_USER_DEFINED = 16
ATTR_BYTE = 32
_ATTR_OF_TYPE = {0: ATTR_UNDEFINED, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL,
                 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}

SPACE = "\u2581"
_KEY = "tokenizer.ggml."

# Tokens llama.cpp recognises by their text when the GGUF does not name them;
# each is turned into a control token.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_ROLE_TEXTS = {
    "eot": _EOT_TEXTS,
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ROLE_KEYS = {"eot": ("eot_token_id",), "eom": ("eom_token_id",),
              "fim_pre": ("fim_pre_token_id", "prefix_token_id"),
              "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
              "fim_mid": ("fim_mid_token_id", "middle_token_id"),
              "fim_pad": ("fim_pad_token_id",), "fim_rep": ("fim_rep_token_id",),
              "fim_sep": ("fim_sep_token_id",)}
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~["))

_CACHE_MAX = 1 << 16
_GROUP_MAX = 16


def _prefix_groups(items, depth):
    """Group (rank, piece, id) items by their first `depth` characters; a group
    of more than _GROUP_MAX is split again by longer prefixes.
    Returns [(prefix, items, None) or (prefix, None, subgroups)]."""
    groups = {}
    for item in items:
        groups.setdefault(item[1][:depth], []).append(item)
    return [(prefix, members, None) if len(members) <= _GROUP_MAX
            else (prefix, None, _prefix_groups(members, depth + 3))
            for prefix, members in groups.items()]


def _find_present(text, groups, out):
    """Append to `out` the grouped items whose piece occurs in `text`."""
    for prefix, members, subgroups in groups:
        if prefix in text:
            if members is None:
                _find_present(text, subgroups, out)
            else:
                out.extend(m for m in members if m[1] in text)


class Tokenizer:
    """Encode text to token ids and back, as llama.cpp does for an SPM vocab."""

    def __init__(self, tokens, scores, token_types, *, bos_id=1, eos_id=2, role_ids=None,
                 add_bos=True, add_eos=False, add_space_prefix=True):
        n = len(tokens)
        if n == 0:
            raise GGUFError("tokenizer: empty vocabulary")
        if len(scores) < n or len(token_types) < n:
            raise GGUFError("tokenizer: fewer scores or token types than tokens")
        self.n_vocab = n
        self.pieces = list(tokens)
        if "" in self.pieces:
            self.pieces = [t if t else "[EMPTY_%d]" % i for i, t in enumerate(tokens)]
        try:
            self.scores = list(map(float, scores[:n]))
            self.attrs = list(map(_ATTR_OF_TYPE.get, token_types[:n],
                                  itertools.repeat(ATTR_UNDEFINED)))
        except (TypeError, ValueError) as e:
            raise GGUFError("tokenizer: invalid scores or token types: %s" % e) from None
        self.piece_to_id = dict(zip(self.pieces, range(n)))
        if len(self.piece_to_id) != n:
            raise GGUFError("tokenizer: duplicate token texts")
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.add_space_prefix = bool(add_space_prefix)
        for name, tid in (("bos", bos_id), ("eos", eos_id)):
            if tid is not None and not 0 <= tid < n:
                raise GGUFError("tokenizer: %s id %d outside the vocabulary" % (name, tid))
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = self._find_eog(role_ids or {})
        hidden = ATTR_CONTROL | ATTR_UNKNOWN
        marked = [i for i, a in enumerate(self.attrs) if a & (hidden | ATTR_USER_DEFINED | ATTR_BYTE)]
        self._byte_of = {}  # byte token id -> its byte
        for i in marked:
            if self.attrs[i] & ATTR_BYTE:
                if not re.fullmatch("<0x[0-9A-Fa-f]{2}>", self.pieces[i]):
                    raise GGUFError("tokenizer: byte token %d is %r, not <0xXX>"
                                    % (i, self.pieces[i]))
                self._byte_of[i] = bytes((int(self.pieces[i][3:5], 16),))
        self._byte_ids = [self.piece_to_id.get("<0x%02X>" % b,
                                               self.piece_to_id.get(chr(b)) if b < 128 else None)
                          for b in range(256)]
        specials = [i for i in marked if self.attrs[i] & (hidden | ATTR_USER_DEFINED)]
        self._specials = {
            False: self._special_tokens([i for i in specials if not self.attrs[i] & hidden]),
            True: self._special_tokens(specials)}
        glue = self._chars_before_space()
        lookbehind = "(?<![%s])" % re.escape("".join(glue)) if glue else ""
        self._chunk_re = re.compile(lookbehind + "(?=" + SPACE + ")")
        self._chunk_cache = {}

    def _chars_before_space(self):
        """Every character that precedes U+2581 inside some piece."""
        everything = "".join(self.pieces)
        sep = next(chr(c) for c in range(1, 0x110000) if chr(c) not in everything)
        return sorted(set(re.findall("([^%s])%s" % (re.escape(sep), SPACE), sep.join(self.pieces))))

    @classmethod
    def from_metadata(cls, metadata):
        """Build from a GGUF metadata dict (key -> plain Python value)."""
        model = metadata.get(_KEY + "model")
        if model != "llama":
            raise GGUFError("tokenizer: unsupported tokenizer model %r (only 'llama')" % (model,))
        tokens = metadata.get(_KEY + "tokens")
        if not isinstance(tokens, (list, tuple)) or set(map(type, tokens)) - {str}:
            raise GGUFError("tokenizer: missing or invalid %stokens" % _KEY)
        n = len(tokens)
        scores = metadata.get(_KEY + "scores", [0.0] * n)
        types = metadata.get(_KEY + "token_type", [1] * n)
        if not isinstance(scores, (list, tuple)) or not isinstance(types, (list, tuple)):
            raise GGUFError("tokenizer: %sscores and %stoken_type must be arrays" % (_KEY, _KEY))

        def token_id(name, default):
            # llama.cpp: an out-of-range default is disabled, an out-of-range value ignored
            tid = default if default is not None and 0 <= default < n else None
            value = metadata.get(_KEY + name)
            if isinstance(value, int) and 0 <= value < n:
                tid = value
            return tid

        role_ids = {}
        for role, keys in _ROLE_KEYS.items():
            for key in keys:
                tid = token_id(key, role_ids.get(role))
                if tid is not None:
                    role_ids[role] = tid
        return cls(tokens, scores, types,
                   bos_id=token_id("bos_token_id", 1), eos_id=token_id("eos_token_id", 2),
                   role_ids=role_ids,
                   add_bos=metadata.get(_KEY + "add_bos_token", True),
                   add_eos=metadata.get(_KEY + "add_eos_token", False),
                   add_space_prefix=metadata.get(_KEY + "add_space_prefix", True))

    def _find_eog(self, role_ids):
        """End-of-generation ids, marking the tokens found by text as control (llama.cpp)."""
        roles = dict(role_ids)
        for role, texts in _ROLE_TEXTS.items():
            if role not in roles:
                found = [self.piece_to_id[t] for t in texts if t in self.piece_to_id]
                if found:
                    roles[role] = min(found)
                    self.attrs[roles[role]] |= ATTR_CONTROL
        eog = {roles[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in roles}
        for text in _EOG_TEXTS:
            tid = self.piece_to_id.get(text)
            if tid is not None:
                eog.add(tid)
                self.attrs[tid] |= ATTR_CONTROL
        eog.update(t for t in (self.eos_id, roles.get("eot"), roles.get("eom")) if t is not None)
        texts = {self.pieces[t] for t in eog}
        if ("<|return|>" in texts and "<|call|>" in texts or
                "<|calls|>" in texts and "<|flush|>" in texts) and "<|end|>" in texts:
            end = self.piece_to_id["<|end|>"]
            eog.discard(end)
            self.attrs[end] = ATTR_USER_DEFINED
        if ("<|tool_response>" in texts or "<|plamo:eos|>" in texts) and "</s>" in texts:
            s = self.piece_to_id["</s>"]
            eog.discard(s)
            self.attrs[s] = ATTR_NORMAL
        return frozenset(eog)

    def _special_tokens(self, ids):
        """The special tokens `ids` matched in raw text, grouped by their first
        three characters, each with its rank in llama.cpp's matching order; and
        a character that none of them contains.

        llama.cpp tries them longest (in bytes) first; among tokens of the same
        length its order is that of an unstable sort, here taken as id order
        (it only matters when two same-length tokens can overlap in a text).
        """
        ids = sorted(ids, key=lambda i: (-len(self.pieces[i].encode("utf-8")), i))
        used = {ch for i in ids for ch in self.pieces[i]}
        mask = next(chr(c) for c in range(1, 0x110000) if chr(c) not in used)
        return _prefix_groups([(rank, self.pieces[i], i) for rank, i in enumerate(ids)], 3), mask

    # ---- encoding ----

    def encode(self, text, add_bos=True, special=False):
        """Token ids of `text`, as `llama_tokenize(vocab, text, add_special=add_bos,
        parse_special=special)`: BOS (and EOS) only if the vocab asks for them."""
        if not isinstance(text, str):
            raise TypeError("text must be str, not %s" % type(text).__name__)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("text is not valid Unicode: %s" % e) from None
        out = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        prev_special = True
        for frag in self._split_special(text, special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                frag = " " + frag
            self._encode_fragment(frag.replace(" ", SPACE), out)
            prev_special = False
        if add_bos and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _split_special(self, text, special):
        """Text fragments (str) and special token ids (int), in order.

        Each token in turn takes its leftmost non-overlapping occurrences in
        the text left, which are then masked with a character no special token
        contains: what llama.cpp does fragment by fragment."""
        if not text:
            return []
        groups, mask = self._specials[special]
        present = []
        _find_present(text, groups, present)
        if not present:
            return [text]
        present.sort()
        left = text
        taken = []
        for _, piece, tid in present:
            p = left.find(piece)
            if p < 0:
                continue
            size = len(piece)
            while p >= 0:
                taken.append((p, tid))
                p = left.find(piece, p + size)
            left = left.replace(piece, mask * size)
        taken.sort()
        frags, at = [], 0
        for p, tid in taken:
            if p > at:
                frags.append(text[at:p])
            frags.append(tid)
            at = p + len(self.pieces[tid])
        if at < len(text):
            frags.append(text[at:])
        return frags

    def _encode_fragment(self, frag, out):
        cache = self._chunk_cache
        for chunk in self._chunk_re.split(frag):
            if not chunk:
                continue
            ids = cache.get(chunk)
            if ids is None:
                ids = self._merge(chunk)
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[chunk] = ids
            out.extend(ids)

    def _merge(self, s):
        """llama.cpp's SPM merge of one chunk: best-scoring adjacent pair first,
        ties to the leftmost."""
        get, scores = self.piece_to_id.get, self.scores
        pop, push = heapq.heappop, heapq.heappush
        n = len(s)
        size = [1] * n  # symbol i is s[i:i + size[i]]; 0 once merged into its left neighbour
        prev = list(range(-1, n - 1))
        heap = [(-scores[t], i, 2) for i, t in enumerate(map(get, [s[i:i + 2] for i in range(n - 1)]))
                if t is not None]
        heapq.heapify(heap)
        while heap:
            _, left, total = pop(heap)
            right = left + size[left]
            # stale: left merged away or grown since the pair was queued
            if right >= n or size[left] == 0 or size[left] + size[right] != total:
                continue
            after = right + size[right]
            size[left] = total
            size[right] = 0
            if after < n:
                prev[after] = left
                t = get(s[left:after + size[after]])
                if t is not None:
                    push(heap, (-scores[t], left, total + size[after]))
            before = prev[left]
            if before >= 0:
                t = get(s[before:after])
                if t is not None:
                    push(heap, (-scores[t], before, after - before))
        ids = []
        i = 0
        while i < n:
            piece = s[i:i + size[i]]
            t = get(piece)
            if t is None:
                ids.extend(self._byte_token(b) for b in piece.encode("utf-8"))
            else:
                ids.append(t)
            i += size[i]
        return tuple(ids)

    def _byte_token(self, b):
        tid = self._byte_ids[b]
        if tid is None:
            raise ValueError("tokenizer: the vocab has no token for byte 0x%02X" % b)
        return tid

    # ---- decoding ----

    def piece_bytes(self, token_id, special=False):
        """The bytes of one token, as `llama_token_to_piece(..., lstrip=0, special)`.

        Control and unknown tokens give b"" unless `special`. A byte token
        gives one byte of a UTF-8 sequence: join the bytes before decoding
        when streaming."""
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise ValueError("token id %d outside [0, %d)" % (token_id, self.n_vocab))
        attr = self.attrs[token_id]
        if not special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        text = self.pieces[token_id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            return text.replace(SPACE, " ").encode("utf-8")
        if attr & ATTR_BYTE:
            return self._byte_of[token_id]
        return b""

    def token_to_piece(self, token_id, special=False):
        """The text of one token (a lone byte token decodes to U+FFFD)."""
        return self.piece_bytes(token_id, special).decode("utf-8", errors="replace")

    def decode(self, ids, special=False):
        """Text of `ids`, as `llama_detokenize(remove_special=False, unparse_special=special)`."""
        parts = [self.piece_bytes(t, special) for t in ids]
        if parts and self.add_space_prefix and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def is_eog(self, token_id):
        """True for tokens that end generation (eos, eot, <end_of_turn>, ...)."""
        return token_id in self.eog_ids

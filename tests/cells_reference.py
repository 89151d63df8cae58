"""A plain Python model of the cell table, the truth the C core is tested against.

Written from llama.cpp's llama_kv_cells and llama_kv_cache (single stream):
every operation loops over all cells the way llama.cpp does, with no index.
It assumes valid arguments (the tests check argument errors separately).
Two rules are ours, as docs/cells.md explains: seq_div records the shift as
new - old position (like seq_add), and defrag moves the used cells at or
beyond `used`, last first, into the holes below `used`, first first.
"""

INT32_MAX = 2**31 - 1


def is_masked_swa(n_swa, swa_type, p0, p1):
    """llama_hparams::is_masked_swa: True when a token at p1 may not see p0."""
    if swa_type == "standard":
        return p1 - p0 >= n_swa
    if swa_type == "chunked":
        return p0 < (p1 // n_swa) * n_swa
    if swa_type == "symmetric":
        return abs(p1 - p0) > n_swa // 2
    return False


def _range(p0, p1):
    return (0 if p0 < 0 else p0), (INT32_MAX + 1 if p1 < 0 else p1)


class RefCells:
    def __init__(self, n_cells, n_seq_max=1, n_swa=0, swa_type="none"):
        self.n_cells, self.n_seq_max = n_cells, n_seq_max
        self.n_swa, self.swa_type = n_swa, swa_type
        self.clear()

    def clear(self):
        self.pos = [-1] * self.n_cells
        self.seq = [set() for _ in range(self.n_cells)]
        self.shift = [0] * self.n_cells
        self.head = 0
        self.has_shift = False

    @property
    def used(self):
        return sum(p >= 0 for p in self.pos)

    @property
    def used_max_p1(self):
        return max((i + 1 for i, p in enumerate(self.pos) if p >= 0), default=0)

    def seq_pos_min(self, s):
        return min((self.pos[i] for i in range(self.n_cells) if s in self.seq[i]), default=-1)

    def seq_pos_max(self, s):
        return max((self.pos[i] for i in range(self.n_cells) if s in self.seq[i]), default=-1)

    def seq_cells(self, s):
        """[(idx, pos)] ordered by position, then index."""
        cells = [(self.pos[i], i) for i in range(self.n_cells) if s in self.seq[i]]
        return [(i, p) for p, i in sorted(cells)]

    def _free(self, i):
        self.pos[i] = -1
        self.seq[i] = set()
        self.shift[i] = 0

    def _usable(self, i):
        if self.pos[i] < 0:
            return True
        if len(self.seq[i]) != 1:
            return False
        (s,) = self.seq[i]
        return is_masked_swa(self.n_swa, self.swa_type, self.pos[i], self.seq_pos_max(s) + 1)

    def find_slot(self, n_tokens, cont=False):
        """llama_kv_cache::find_slot for one stream: the cells, or None when full."""
        size = self.n_cells
        head = self.head
        if head > self.used + 2 * n_tokens:
            head = 0
        if n_tokens > size:
            return None
        n_test = n_tokens if cont else 1
        n_tested = 0
        found = []
        while True:
            if head + n_test > size:
                n_tested += size - head
                head = 0
                continue
            for _ in range(n_test):
                idx = head
                head += 1
                n_tested += 1
                if self._usable(idx):
                    found.append(idx)
                elif cont:
                    break
            if len(found) == n_tokens:
                return found
            if cont:
                found = []
            if n_tested >= size:
                return None

    def apply_ubatch(self, idxs, pos, seq_lists):
        """seq_lists: one list of sequence ids per token."""
        max_rm = {}
        for c, p, seqs in zip(idxs, pos, seq_lists):
            if self.pos[c] >= 0:
                (s,) = self.seq[c]
                max_rm[s] = max(max_rm.get(s, -1), self.pos[c])
                self._free(c)
            self.pos[c] = p
            self.seq[c] = set(seqs)
        for s in sorted(max_rm):
            if self.seq_pos_min(s) <= max_rm[s]:
                self.seq_rm(s, self.seq_pos_min(s), max_rm[s] + 1)
        self.head = idxs[-1] + 1

    def seq_rm(self, s, p0=-1, p1=-1):
        p0, p1 = _range(p0, p1)
        new_head = self.n_cells
        for i in range(self.n_cells):
            if not p0 <= self.pos[i] < p1:
                continue
            if s == -1 or s in self.seq[i]:
                self.seq[i].discard(s)
                if s == -1 or not self.seq[i]:
                    self._free(i)
                    new_head = min(new_head, i)
        if new_head < self.head:
            self.head = new_head
        return True

    def seq_cp(self, src, dst, p0=-1, p1=-1):
        if src == dst:
            return
        p0, p1 = _range(p0, p1)
        for i in range(self.n_cells):
            if p0 <= self.pos[i] < p1 and src in self.seq[i]:
                self.seq[i].add(dst)

    def seq_keep(self, s):
        new_head = self.n_cells
        for i in range(self.n_cells):
            if s in self.seq[i]:
                self.seq[i] = {s}
            elif self.seq[i]:
                self._free(i)
                new_head = min(new_head, i)
        if new_head < self.head:
            self.head = new_head

    def seq_add(self, s, p0, p1, delta):
        if delta == 0:
            return
        p0, p1 = _range(p0, p1)
        if p0 == p1:
            return
        new_head = self.n_cells
        for i in range(self.n_cells):
            if p0 <= self.pos[i] < p1 and s in self.seq[i]:
                self.pos[i] += delta
                self.shift[i] += delta
                self.has_shift = True
                if self.pos[i] < 0:
                    self._free(i)
                    new_head = min(new_head, i)
        self.head = new_head if new_head < self.n_cells else 0

    def seq_div(self, s, p0, p1, d):
        if d == 1:
            return
        p0, p1 = _range(p0, p1)
        if p0 == p1:
            return
        for i in range(self.n_cells):
            if p0 <= self.pos[i] < p1 and s in self.seq[i]:
                old = self.pos[i]
                self.pos[i] = old // d
                self.shift[i] += self.pos[i] - old
                self.has_shift = True

    def take_shifts(self):
        out = list(self.shift)
        self.shift = [0] * self.n_cells
        self.has_shift = False
        return out

    def defrag(self):
        used = self.used
        holes = [i for i in range(used) if self.pos[i] < 0]
        movers = [j for j in reversed(range(used, self.n_cells)) if self.pos[j] >= 0]
        moves = list(zip(movers, holes))
        for src, dst in moves:
            self.pos[dst], self.seq[dst], self.shift[dst] = self.pos[src], self.seq[src], self.shift[src]
            self._free(src)
        if moves:
            self.head = used
        return moves

    def kq_mask(self, pos, first_seqs, n_kv):
        """[[visible]] per token and cell j < n_kv."""
        rows = []
        for p1, s in zip(pos, first_seqs):
            rows.append([self.pos[j] >= 0 and s in self.seq[j] and self.pos[j] <= p1
                         and not is_masked_swa(self.n_swa, self.swa_type, self.pos[j], p1)
                         for j in range(n_kv)])
        return rows

"""GGUF model files: metadata, hyperparameters and weights.

The header is parsed here with `struct` (gguf-py's GGUFReader builds numpy
views per array element and takes ~15 s on a 262144-token vocabulary); the
`gguf` package supplies the type tables and the dequantisation code. Every
length, count, offset and shape is checked before use: a malformed file
raises GGUFError naming the file and the reason.
"""
import math
import mmap
import struct
from dataclasses import dataclass, fields

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from . import arch as archs
from . import matmul
from .errors import GGUFError
from .native import TYPES, huge_page_buffer

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS

_SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Weight:
    """A 2-D weight matrix in its file type: shape (n_out, n_in), rows in `raw`."""

    def __init__(self, name, type_name, shape, raw):
        self.name = name
        self.type = type_name
        self.shape = shape
        self.raw = raw

    def __repr__(self):
        return f"Weight({self.name!r}, {self.type}, shape={self.shape})"

    def dequantize(self):
        """The whole matrix as float32 (n_out, n_in)."""
        return _dequantize_rows(self.raw, self.type, self.shape[1])

    def rows(self, ids):
        """Rows `ids` as float32 (len(ids), n_in); only those rows are decoded."""
        return matmul.dequantize_rows(self.raw, self.type, self.shape[1], ids)

    def matmul(self, x, n_threads=None):
        """x @ W.T for x float32 (n, n_in) -> float32 (n, n_out), by the C
        kernels on the weights in their file type (n_threads None: the
        default, kvcells.set_num_threads)."""
        return matmul.matmul(self.raw, self.type, self.shape[0], self.shape[1], x, n_threads)


def _dequantize_rows(raw, type_name, n_in):
    out = np.asarray(dequantize(raw, GGMLQuantizationType[type_name]), dtype=np.float32)
    if not out.flags.writeable:  # F32 rows are a view of the read-only tensor data
        out = out.copy()
    return out.reshape(raw.shape[0], n_in)


@dataclass
class HParams:
    """Hyperparameters of one model; attribute and ["key"] access."""
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int
    swa_type: str            # "none" or "standard"
    swa_layers: list         # per layer, True = sliding-window layer
    rope_mode: str           # "norm" (llama) or "neox" (gemma3)
    rope_base: float
    rope_base_swa: float
    rope_freq_scale: float
    rope_freq_scale_swa: float
    norm_eps: float
    attn_scale: float
    logit_softcap: float     # 0.0 = none

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self)]


class GGUFModelFile:
    """A loaded GGUF model: architecture, hyperparameters, metadata, tensors."""

    def __init__(self, path, arch, hparams, metadata, tensors):
        self.path = path
        self.arch = arch
        self.hparams = hparams
        self.metadata = metadata
        self.tensors = tensors

    def __repr__(self):
        return (f"GGUFModelFile({self.path!r}, arch={self.arch!r}, "
                f"{len(self.tensors)} tensors)")


def load_gguf(path):
    """Read a GGUF v2/v3 model file of a supported architecture. The file is
    mapped only while its header is read: the tensor data is a copy, so the
    model does not depend on the file afterwards."""
    path = str(path)
    buf = np.frombuffer(_map_file(path), dtype=np.uint8)
    metadata, infos, data_start, alignment = _Header(path, buf).read()
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: general.architecture is missing or not a string")
    spec = archs.spec(arch)
    if spec is None:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} "
                        f"(supported: {', '.join(archs.NAMES)})")
    tensors = _load_tensors(path, buf, _read_data(path, data_start, len(buf)), infos,
                            data_start, alignment)
    hparams = _read_hparams(path, arch, spec, metadata, tensors)
    _check_tensors(path, spec, hparams, tensors)
    return GGUFModelFile(path, arch, hparams, metadata, tensors)


def _map_file(path):
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        raise GGUFError(f"{path}: empty file") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
    return mm


class _Header:
    """Sequential reader of the GGUF header, bounds-checked at every step."""

    def __init__(self, path, buf):
        self.path = path
        self.buf = buf
        self.mv = memoryview(buf)
        self.pos = 0

    def fail(self, reason):
        raise GGUFError(f"{self.path}: {reason}")

    def need(self, n, what):
        if n > len(self.buf) - self.pos:
            self.fail(f"truncated file: {what} at offset {self.pos} needs {n} bytes, "
                      f"{len(self.buf) - self.pos} left")

    def u32(self, what):
        self.need(4, what)
        (v,) = _U32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def u64(self, what):
        self.need(8, what)
        (v,) = _U64.unpack_from(self.mv, self.pos)
        self.pos += 8
        return v

    def string(self, what):
        n = self.u64(what)
        self.need(n, what)
        try:
            s = str(self.mv[self.pos:self.pos + n], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {self.pos} is not valid UTF-8")
        self.pos += n
        return s

    def read(self):
        self.need(4, "magic")
        if bytes(self.mv[:4]) != b"GGUF":
            self.fail(f"not a GGUF file (magic {bytes(self.mv[:4])!r})")
        self.pos = 4
        version = self.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            self.fail("big-endian GGUF files are not supported")
        if version not in (2, 3):
            self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        # each key-value pair takes >= 12 bytes, each tensor info >= 24
        if n_kv > (len(self.buf) - self.pos) // 12:
            self.fail(f"metadata count {n_kv} does not fit in the file")
        if n_tensors > (len(self.buf) - self.pos) // 24:
            self.fail(f"tensor count {n_tensors} does not fit in the file")
        metadata = {}
        for _ in range(n_kv):
            key = self.string("metadata key")
            if key in metadata:
                self.fail(f"duplicate metadata key {key!r}")
            metadata[key] = self.value(key)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        names = set()
        for info in infos:
            if info[0] in names:
                self.fail(f"duplicate tensor {info[0]!r}")
            names.add(info[0])
        alignment = metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            self.fail(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        for name, _, _, offset in infos:
            if offset % alignment:
                self.fail(f"tensor {name!r}: data offset {offset} is not a multiple of "
                          f"the alignment {alignment}")
        return metadata, infos, data_start, alignment

    def value(self, key):
        vtype = self.type_id(self.u32(f"type of {key!r}"), key)
        if vtype == GGUFValueType.ARRAY:
            etype = self.type_id(self.u32(f"element type of {key!r}"), key)
            n = self.u64(f"length of {key!r}")
            if etype == GGUFValueType.ARRAY:
                self.fail(f"metadata {key!r}: arrays of arrays are not supported")
            if etype == GGUFValueType.STRING:
                self.need(8 * n, f"array {key!r}")
                return [self.string(f"element of {key!r}") for _ in range(n)]
            dtype = _SCALAR_DTYPES[etype]
            self.need(dtype.itemsize * n, f"array {key!r}")
            arr = np.frombuffer(self.buf, dtype, n, self.pos)
            self.pos += dtype.itemsize * n
            return (arr != 0).tolist() if etype == GGUFValueType.BOOL else arr.tolist()
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        dtype = _SCALAR_DTYPES[vtype]
        self.need(dtype.itemsize, f"value of {key!r}")
        v = np.frombuffer(self.buf, dtype, 1, self.pos)[0]
        self.pos += dtype.itemsize
        return bool(v) if vtype == GGUFValueType.BOOL else v.item()

    def type_id(self, t, key):
        try:
            return GGUFValueType(t)
        except ValueError:
            self.fail(f"metadata {key!r} has unknown value type {t}")

    def tensor_info(self):
        name = self.string("tensor name")
        n_dims = self.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            self.fail(f"tensor {name!r} has {n_dims} dimensions (1..4 allowed)")
        dims = [self.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        type_id = self.u32(f"type of tensor {name!r}")
        offset = self.u64(f"data offset of tensor {name!r}")
        if any(d == 0 or d >= 2**62 for d in dims) or math.prod(dims) >= 2**62:
            self.fail(f"tensor {name!r} has invalid shape {dims}")
        return name, dims, type_id, offset


def _read_data(path, start, size):
    """Bytes start..size of the file (the tensor data), read-only, in
    native.huge_page_buffer: through the file's mapping, in 4 KiB pages, the
    head's matmul took 0-16% more time on a calm machine and a third more on
    a busy one (docs/benchmarks.md, "One-token decode at memory speed"). The
    copy costs the process the data's size in resident memory, not shared
    with other processes as the page cache is."""
    if start >= size:
        return np.zeros(0, np.uint8)
    mem = huge_page_buffer(size - start)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(mem)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror or e}") from None
    if got != size - start:
        raise GGUFError(f"{path}: the file changed size while it was loaded")
    data = np.frombuffer(mem, dtype=np.uint8)
    data.flags.writeable = False
    return data


def _load_tensors(path, buf, data, infos, data_start, alignment):
    """As llama.cpp: each tensor's data starts where the one before it ends,
    padded to the alignment, so tensors never overlap or leave gaps. buf is
    the whole file, data its bytes from data_start on."""
    tensors = {}
    expected = 0
    for name, dims, type_id, offset in infos:
        try:
            type_name = GGMLQuantizationType(type_id).name
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown type id {type_id}") from None
        if type_name not in TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has unsupported type {type_name} "
                            f"(supported: {', '.join(TYPES)})")
        if len(dims) > 2:
            raise GGUFError(f"{path}: tensor {name!r} has {len(dims)} dimensions; "
                            "only 1-D and 2-D tensors are supported")
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        n_in = dims[0]
        n_out = dims[1] if len(dims) == 2 else 1
        if n_in % block:
            raise GGUFError(f"{path}: tensor {name!r}: row length {n_in} is not a "
                            f"multiple of the {type_name} block size {block}")
        row_bytes = n_in // block * block_bytes
        start = data_start + offset
        if start > len(buf) or n_out * row_bytes > len(buf) - start:
            raise GGUFError(f"{path}: tensor {name!r}: data [{start}, "
                            f"{start + n_out * row_bytes}) lies beyond the end of "
                            f"the file ({len(buf)} bytes)")
        if offset != expected:
            raise GGUFError(f"{path}: tensor {name!r}: data offset {offset}, expected {expected} "
                            "(tensors must follow each other, padded to the alignment)")
        expected += -(-n_out * row_bytes // alignment) * alignment
        raw = data[offset:offset + n_out * row_bytes].reshape(n_out, row_bytes)
        if len(dims) == 2:
            tensors[name] = Weight(name, type_name, (n_out, n_in), raw)
        else:
            tensors[name] = _dequantize_rows(raw, type_name, n_in)[0]
    return tensors


# --- hyperparameters ---------------------------------------------------------

def _get(path, metadata, key, kind, default=None):
    """metadata[key] checked to be an int, float, str or bool; default if absent."""
    if key not in metadata:
        if default is None:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    v = metadata[key]
    ok = {"int": type(v) is int,
          "float": type(v) in (int, float),
          "str": type(v) is str,
          "bool": type(v) is bool}[kind]
    if not ok:
        raise GGUFError(f"{path}: metadata {key!r} should be {kind}, got {v!r:.60}")
    return float(v) if kind == "float" else v


def _get_per_layer(path, metadata, key, n_layer, default=None):
    """An int that may be stored as one value per layer (all equal, here)."""
    v = metadata.get(key)
    if isinstance(v, list):
        if len(v) != n_layer or any(type(x) is not int for x in v):
            raise GGUFError(f"{path}: metadata {key!r} should hold {n_layer} integers")
        if len(set(v)) != 1:
            raise GGUFError(f"{path}: metadata {key!r}: per-layer values differ "
                            f"({sorted(set(v))}); not supported")
        return v[0]
    return _get(path, metadata, key, "int", default)


def _read_hparams(path, arch, spec, md, tensors):
    def key(name):
        return f"{arch}.{name}"

    n_layer = _get(path, md, key("block_count"), "int")
    if not 1 <= n_layer <= MAX_LAYERS:
        raise GGUFError(f"{path}: block_count {n_layer} outside [1, {MAX_LAYERS}]")
    n_embd = _get(path, md, key("embedding_length"), "int")
    n_ff = _get_per_layer(path, md, key("feed_forward_length"), n_layer)
    n_head = _get_per_layer(path, md, key("attention.head_count"), n_layer)
    n_head_kv = _get_per_layer(path, md, key("attention.head_count_kv"), n_layer, n_head)
    for name, v in (("embedding_length", n_embd), ("feed_forward_length", n_ff),
                    ("attention.head_count", n_head),
                    ("attention.head_count_kv", n_head_kv)):
        if v <= 0:
            raise GGUFError(f"{path}: {key(name)} must be positive, got {v}")
    if n_head % n_head_kv:
        raise GGUFError(f"{path}: head_count {n_head} is not a multiple of "
                        f"head_count_kv {n_head_kv}")
    head_dim = _get(path, md, key("attention.key_length"), "int", n_embd // n_head)
    head_dim_v = _get(path, md, key("attention.value_length"), "int", head_dim)
    n_rot = _get(path, md, key("rope.dimension_count"), "int", head_dim)
    if head_dim <= 0 or head_dim % 2 or head_dim_v <= 0:
        raise GGUFError(f"{path}: invalid head size (key {head_dim}, value {head_dim_v})")
    if n_rot != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {n_rot} != head size {head_dim}; "
                        "partial rotary embeddings are not supported")

    n_vocab = _n_vocab(path, arch, md, tensors)
    n_ctx_train = _get(path, md, key("context_length"), "int")
    norm_eps = _get(path, md, key("attention.layer_norm_rms_epsilon"), "float")

    rope_base = _get(path, md, key("rope.freq_base"), "float", 10000.0)
    rope_base_swa = _get(path, md, key("rope.freq_base_swa"), "float", 10000.0)
    scaling = _get(path, md, key("rope.scaling.type"), "str", "linear")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: unsupported rope scaling type {scaling!r}")
    factor = _get(path, md, key("rope.scaling.factor"), "float", 0.0)
    if factor == 0.0:
        factor = _get(path, md, key("rope.scale_linear"), "float", 0.0)
    if factor < 0 or not math.isfinite(factor):
        raise GGUFError(f"{path}: invalid rope scaling factor {factor}")
    rope_freq_scale = 1.0 if factor == 0.0 else 1.0 / factor

    for name, v in (("rope_base", rope_base), ("rope_base_swa", rope_base_swa),
                    ("norm_eps", norm_eps)):
        if not (math.isfinite(v) and v > 0):
            raise GGUFError(f"{path}: {name} must be a positive finite number, got {v}")

    hp = HParams(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab,
        n_ctx_train=n_ctx_train, n_swa=0, swa_type="none",
        swa_layers=[False] * n_layer, rope_mode=spec.ROPE_MODE,
        rope_base=rope_base, rope_base_swa=rope_base_swa,
        rope_freq_scale=rope_freq_scale, rope_freq_scale_swa=1.0,
        norm_eps=norm_eps, attn_scale=1.0 / math.sqrt(head_dim), logit_softcap=0.0)
    spec.read_hparams(_Metadata(path, arch, md), hp)
    return hp


class _Metadata:
    """An architecture's view of the metadata: its keys without the
    "<arch>." prefix, checked as _get does."""

    def __init__(self, path, arch, md):
        self.path, self.arch, self.md = path, arch, md

    def get(self, name, kind, default=None):
        return _get(self.path, self.md, f"{self.arch}.{name}", kind, default)

    def swa_pattern(self, name, n_layer, default_period):
        return _swa_pattern(self.path, self.md, f"{self.arch}.{name}", n_layer, default_period)

    def fail(self, reason):
        raise GGUFError(f"{self.path}: {reason}")





def _n_vocab(path, arch, md, tensors):
    """llama.cpp takes the vocabulary size from the token list."""
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if f"{arch}.vocab_size" in md:
        return _get(path, md, f"{arch}.vocab_size", "int")
    embd = tensors.get("token_embd.weight")
    if isinstance(embd, Weight):
        return embd.shape[0]
    raise GGUFError(f"{path}: cannot tell the vocabulary size "
                    "(no tokenizer.ggml.tokens, no token_embd.weight)")


def _swa_pattern(path, md, key, n_layer, default_period):
    """Per-layer SWA flags: an explicit flag array (layers past its end are
    full attention, as in llama.cpp), or a period n whose last layer of every
    n is full attention (llama.cpp's set_swa_pattern)."""
    v = md.get(key, default_period)
    if isinstance(v, list):
        if len(v) > MAX_LAYERS or any(type(x) not in (bool, int) for x in v):
            raise GGUFError(f"{path}: metadata {key!r} should hold at most "
                            f"{MAX_LAYERS} integer or bool flags")
        return [bool(x) for x in v[:n_layer]] + [False] * (n_layer - len(v))
    if type(v) is not int or v < 0:
        raise GGUFError(f"{path}: metadata {key!r} should be a non-negative integer")
    return [v == 0 or il % v < v - 1 for il in range(n_layer)]


# --- required tensors and their shapes ----------------------------------------

def _check_tensors(path, spec, hp, tensors):
    """Every tensor the architecture needs, and each tensor's shape."""
    shapes = archs.tensor_shapes(hp)
    required = {"token_embd.weight": shapes["token_embd"],
                "output_norm.weight": shapes["output_norm"]}
    for i in range(hp.n_layer):
        required.update({f"blk.{i}.{name}.weight": shapes[name] for name in spec.WEIGHTS})
    optional = {f"{name}.weight": shapes[name] for name in ("output", *spec.OPTIONAL)}
    for name in required:
        if name not in tensors:
            raise GGUFError(f"{path}: missing tensor {name!r}")
    for name, want in {**required, **optional}.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != want:
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                            f"expected {want} from the hyperparameters")

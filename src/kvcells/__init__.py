"""kvcells: a llama.cpp-style KV cache engine for Python with a C core."""
from .batch import Batch
from .cache import ISWACache, KVCache
from .cells import CellTable
from .context import Context
from .errors import CacheFullError, GGUFError, KVCellsError, StateError
from .generate import generate, generate_parallel, serve
from .gguf_model import GGUFModelFile, HParams, Weight, load_gguf
from .model import Model
from .native import get_num_threads, set_num_threads
from .sampling import Sampler
from .tokenizer import Tokenizer

__all__ = ["CellTable", "KVCache", "ISWACache", "KVCellsError", "CacheFullError", "GGUFError", "StateError",
           "load_gguf", "GGUFModelFile", "HParams", "Weight",
           "Model", "Tokenizer", "Batch", "Context", "Sampler",
           "generate", "generate_parallel", "serve", "get_num_threads", "set_num_threads"]

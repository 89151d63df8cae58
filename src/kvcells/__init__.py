"""kvcells: a llama.cpp-style KV cache engine for Python with a C core."""
from .cells import CellTable
from .errors import CacheFullError, GGUFError, KVCellsError, StateError
from .gguf_model import GGUFModelFile, HParams, Weight, load_gguf
from .tokenizer import Tokenizer

__all__ = ["CellTable", "KVCellsError", "CacheFullError", "GGUFError", "StateError",
           "load_gguf", "GGUFModelFile", "HParams", "Weight", "Tokenizer"]

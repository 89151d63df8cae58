"""kvcells: a llama.cpp-style KV cache engine for Python with a C core."""
from .errors import CacheFullError, GGUFError, KVCellsError, StateError

__all__ = ["KVCellsError", "CacheFullError", "GGUFError", "StateError"]

"""The exceptions of kvcells (docs/api.md, "Errors")."""


class KVCellsError(Exception):
    """Base of every error raised by kvcells."""


class CacheFullError(KVCellsError):
    """No slot for a ubatch; the cache is left exactly as it was."""


class GGUFError(KVCellsError, ValueError):
    """A model file that is unreadable, truncated, inconsistent or unsupported."""


class StateError(KVCellsError, ValueError):
    """A saved state that is corrupt, truncated or made for another shape."""

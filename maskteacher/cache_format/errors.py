"""Errors raised by the cache format. This package imports nothing else from maskteacher."""


class CacheError(Exception):
    """A cache that is missing, corrupt, unsafe, or does not match what the caller asked for."""

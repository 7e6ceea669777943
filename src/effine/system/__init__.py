"""Process-level facts and switches: the heap allocator, resident memory, the cache directory (no torch here)."""

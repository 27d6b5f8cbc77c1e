"""Decoding media files into fixed-size uint8 arrays, one status per row (never raising)."""

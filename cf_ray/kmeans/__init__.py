"""k-means: pure numpy/faiss math in core.py (tested without Ray); Ray actors wrap it."""

"""The benchmark suite of ime-recorder (``make bench``; see bench/README.md)."""

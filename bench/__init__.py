"""layertap's benchmarks: measurement scripts (run as `python -m bench.<script>`) and the modules
of the side-by-side comparison (`bench/compare.py`), importable so its harness can be tested."""

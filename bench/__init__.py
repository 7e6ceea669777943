"""effine's benchmark harness and experiment scripts: run them from the repository root as `python -m bench.NAME`
(they share bench/common.py; effine itself comes from the installed package)."""

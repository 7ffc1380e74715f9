"""Benchmarks of e3relax-fast, run as modules from the repository root.

``python -m bench.run_cpu`` runs every CPU benchmark and writes ``bench/RESULTS.md``;
``python -m bench.bench_<op>`` runs one (``--help`` lists its flags). The shared parts:
:mod:`.harness` (machine, timing, providers), :mod:`.inputs` (the MP-like mix and the scaling
series), :mod:`.report` (tables, CSV log, RESULTS.md) and :mod:`.cost_model` (spec §14).
See ``bench/README.md``.
"""

"""Benchmarks of greenleader against the official peers, on real servers it starts itself.

Run everything with ``python -m benchmarks`` (``--quick`` for a smoke run, ``--help`` for the
options). The package imports nothing here, so that ``python -m benchmarks.worker`` can
monkey-patch gevent before anything else is imported.
"""

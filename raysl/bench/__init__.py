"""Benchmarks: ``raysl bench NAME`` runs ``raysl.bench.NAME.main(argv)``."""

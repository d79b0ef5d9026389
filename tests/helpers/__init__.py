"""Shared test helpers: float64 loop references of the attention, the CLI runners, recipe builders, fault
probes (imported as ``helpers.<module>``; tests/ is on sys.path through the rootdir conftest)."""

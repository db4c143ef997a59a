"""Tools used by the examples and the tests (not part of the library)."""

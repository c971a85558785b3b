"""Public ops, one module per family: validation, backend dispatch, docstrings."""

"""Tokenizer fixtures shipped with the package (data only; see `sim/build_tokenizer.py`)."""

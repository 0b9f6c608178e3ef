"""Parity tools: run a published method's fixture case end to end from its folder (``python -m incontext.parity``)."""

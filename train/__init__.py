"""Training loops and their entry points (python -m train.gsb, python -m train.head)."""

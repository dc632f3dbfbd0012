"""The application layer: the ``sqakd-hf`` command, recipes, data, model loading and the quickstart."""

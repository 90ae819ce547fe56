"""One module per CLI subcommand (``expand``, ``inspect``, ``finetune``, ``analyze``, ``compile``, ``bench``),
each with ``register(subparsers)`` and a handler that calls the Python API and prints its report."""

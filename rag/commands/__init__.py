"""CLI verbs: thin wiring over the Python API (each module has one `register(subparsers)`)."""

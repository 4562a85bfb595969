"""CLI command areas; each module exposes `register(subparsers)`."""

"""The ``sealedsum`` command: one entry point, subcommands from each role's package."""

__version__ = "0.1.0"

"""``python -m pruneflow.cli``."""

from pruneflow.cli import main

main()

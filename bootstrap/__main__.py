"""Entry point for `python3 -m bootstrap`."""

from bootstrap.cli import main

raise SystemExit(main())

"""`python -m discovery`: the same as the `waypost` command."""

from discovery.cli import main

raise SystemExit(main())

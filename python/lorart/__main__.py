"""``python -m lorart`` runs the command-line interface."""

from lorart.cli import main

raise SystemExit(main())

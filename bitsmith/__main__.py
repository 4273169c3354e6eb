"""`python -m bitsmith` runs the CLI."""
from .cli import main

raise SystemExit(main())

"""``python -m fastalign ...``: the command line (see ``fastalign.cli``)."""

from .cli import main

raise SystemExit(main())

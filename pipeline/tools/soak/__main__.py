"""`python -m pipeline.tools.soak ...`: the soak without the rest of the CLI."""

from pipeline.tools.soak.command import main

raise SystemExit(main())

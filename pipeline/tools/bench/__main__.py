"""`python -m pipeline.tools.bench ...`: the bench without the rest of the CLI."""

from pipeline.tools.bench.command import main

raise SystemExit(main())

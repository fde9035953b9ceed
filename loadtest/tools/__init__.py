"""One-purpose tools, each a ``python -m loadtest <command>``: bench, stages, bare, coldstart,
overhead, overload, scaling, soak, fuzz (``python -m loadtest --help`` lists them)."""

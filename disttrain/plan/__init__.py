"""``disttrain plan``: predicted memory and step time per strategy before launch. ``model`` holds
the formulas, ``probe`` measures this host, ``core`` composes a prediction, ``measure`` runs the
plan's strategies for real to check it, ``cli`` is the sub-command."""

"""The engine: the one optimizer step every strategy shares, model materialization, and the
capability checks that refuse what a strategy cannot honour before any worker starts."""

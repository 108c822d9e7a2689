"""The ``curvature`` command and the jobs behind it (prune, train, sweep, report, check)."""

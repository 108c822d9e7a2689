"""Tasks: the models and data a job works on (offline packages, local folders and files)."""

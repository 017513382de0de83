"""`python -m controlplane.cli`: the same as the `cwlite` command."""
from controlplane.cli.main import run

run()

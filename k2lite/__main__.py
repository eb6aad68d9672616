"""`python -m k2lite ...`: the same as the `k2lite` command."""
from .cli import main

main()

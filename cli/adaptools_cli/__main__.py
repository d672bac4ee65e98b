"""`python -m adaptools_cli` runs the CLI."""
from .main import main

main()

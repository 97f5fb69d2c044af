"""`python -m blockffn.cli`."""

from blockffn.cli import main

main()

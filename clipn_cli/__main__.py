"""`python -m clipn_cli` runs the `clipn` command line."""

from clipn_cli.cli.app import main

main()

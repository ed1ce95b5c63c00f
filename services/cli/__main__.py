"""`python -m gymbus.services.cli`: the same as the `gymbus` command."""

from gymbus.services.cli.main import main

main()

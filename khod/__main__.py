"""``python -m khod``: the daemon."""

from khod.main import main

main()

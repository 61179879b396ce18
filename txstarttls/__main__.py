"""``python -m txstarttls``: the same as the ``txstarttls`` command."""

from txstarttls.cli import main

main()

"""The ``cnncodes`` program: the command goes to the warm runner where it can take it
(:mod:`cnncodes.handoff`), else it runs in this process (:func:`cnncodes.cli.main`)."""
from __future__ import annotations

import sys


def main() -> None:
    from cnncodes import handoff

    code = handoff.try_run(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from cnncodes.cli import main as cli_main

    cli_main(try_runner=False)


if __name__ == "__main__":
    main()

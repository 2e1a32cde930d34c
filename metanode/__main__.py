"""`python -m metanode`: the same as the `metanode` command."""

import sys

from metanode.cli import main

if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    finally:
        # CPython (3.8 on) under `-m` only: if the last string eval()/exec() of the
        # process ended with a KeyboardInterrupt (Ctrl-C landing while a namedtuple or
        # dataclass was being made), it kills itself with SIGINT at exit even though
        # the interrupt was caught, and exit code 130 becomes "killed by SIGINT". A
        # string eval that ends normally clears that mark; the `metanode` console
        # script never has it.
        eval("0")
    sys.exit(code)

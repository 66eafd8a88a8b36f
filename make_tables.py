"""Paper tables: ``python make_tables.py --fname tables/X [--collect] [--dry-run]``.

Runs the rows of the table whose run folder has no ``results.json`` (``--collect``: runs nothing),
then prints and writes ``<table>.md`` and ``<table>.csv``: ours, the paper's value, the difference.
``--dry-run`` prints exactly the commands it would run.
"""

import os
import sys

from ijepa_toolkit.tables import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

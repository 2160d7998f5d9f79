"""Summarise and plot a grid run: python jobs/report.py RUN_DIR (see rotserve/report/)."""

import sys

from rotserve.report.cli import main

if __name__ == "__main__":
    sys.exit(main())

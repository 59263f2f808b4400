"""Weighted kNN classification: see unicom/programs/knn.py or run with --help."""

import sys

from unicom.programs.flags import run_cli
from unicom.programs.knn import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Retrieval evaluation and fine-tuning: see unicom/programs/retrieval.py or run with --help."""

import sys

from unicom.programs.flags import run_cli
from unicom.programs.retrieval import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

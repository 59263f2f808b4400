"""Cluster discrimination pretraining on pseudo labels: see unicom/programs/pretrain.py or run with --help."""

import sys

from unicom.programs.flags import run_cli
from unicom.programs.pretrain import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

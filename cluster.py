"""K-means pseudo classes from features: see unicom/programs/cluster.py or run with --help."""

import sys

from unicom.programs.flags import run_cli
from unicom.programs.cluster import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

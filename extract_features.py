"""Features for clustering: see unicom/programs/extract_features.py or run with --help."""

import sys

from unicom.programs.flags import run_cli
from unicom.programs.extract_features import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

"""`moedit bench model` as a script (same arguments): see moedit/bench/model.py for what is timed and how.

    PYTHONPATH=src python benchmarks/model_step.py --preset gpu      # GPU: DiT-XL/2, 256 tokens, bf16
    PYTHONPATH=src python benchmarks/model_step.py --preset cpu      # the quickstart's sizes on a CPU
"""

import sys

from moedit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "model", *sys.argv[1:]]))

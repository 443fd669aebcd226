"""`moedit bench layer` as a script (same arguments): see moedit/bench/layer.py for what is timed and how.

    PYTHONPATH=src python benchmarks/moe_layer.py --preset dit      # GPU: DiT-XL shapes
    PYTHONPATH=src python benchmarks/moe_layer.py --preset cpu      # the quickstart's sizes on a CPU
"""

import sys

from moedit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))

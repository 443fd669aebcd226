"""How long the checkpoint checksum takes: `moedit.utils.files.file_sha256` over a file of random bytes read
back from the page cache, the cost every checkpoint save and load pays per file (docs/RELIABILITY.md).

    python benchmarks/checksum_speed.py [--mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from moedit.utils.files import file_sha256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        file_sha256(f.name)  # warm the page cache
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            file_sha256(f.name)
            times.append(time.perf_counter() - t0)
    gib = args.mib / 1024
    print(f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}: sha256 of {args.mib} MiB: "
          + ", ".join(f"{t / gib:.2f}" for t in times) + " s per GiB")


if __name__ == "__main__":
    main()

"""`moedit export`: write the single-file weights of a sharded checkpoint (parallel.data=fsdp runs), so that
`moedit sample`, `eval`, `diagnose` and `convert` can read it."""

from __future__ import annotations

HELP = "write model.safetensors and ema.safetensors of a sharded (FSDP) checkpoint; one process, any world size"


def add_arguments(p) -> None:
    p.add_argument("path", help="a run directory (its latest checkpoint) or one checkpoints/step_* directory")
    p.add_argument("--all", action="store_true", help="every checkpoint of the run, not only the latest")


def run(args) -> int:
    from pathlib import Path

    from moedit.runs import open_checkpoint
    from moedit.train import checkpoint as ckpt
    from moedit.train.sharded_checkpoint import export_weights
    from moedit.utils.lock import DirLock

    ckpt_dir, run_dir, _ = open_checkpoint(args.path)
    targets = ckpt.list_checkpoints(Path(run_dir) / "checkpoints") if args.all and run_dir else [ckpt_dir]
    # held like `moedit train` holds it: a run being trained prunes old checkpoints while we read them
    lock = DirLock(run_dir, "moedit export") if run_dir is not None else None
    if lock is not None:
        lock.acquire()
    try:
        for target in targets:
            state = ckpt.read_state(target)
            if not ckpt.is_sharded(state):
                print(f"{target}: a plain checkpoint, its single-file weights are there already")
                continue
            written = export_weights(target)
            print(f"{target}: " + (", ".join(p.name for p in written) + " written" if written else "exported already"))
    finally:
        if lock is not None:
            lock.release()
    return 0

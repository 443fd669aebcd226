"""`moedit` entry point: parses the subcommand and turns user-fixable errors into one clear line."""

from __future__ import annotations

import argparse
import sys

from moedit.cli import autoencoder as autoencoder_cmd
from moedit.cli import bench as bench_cmd
from moedit.cli import convert as convert_cmd
from moedit.cli import diagnose as diagnose_cmd
from moedit.cli import eval as eval_cmd
from moedit.cli import export as export_cmd
from moedit.cli import extract as extract_cmd
from moedit.cli import peer_import as import_cmd
from moedit.cli import plan as plan_cmd
from moedit.cli import sample as sample_cmd
from moedit.cli import train as train_cmd
from moedit.cli import zoo as zoo_cmd

COMMANDS = {"train": train_cmd, "sample": sample_cmd, "eval": eval_cmd, "convert": convert_cmd,
            "import": import_cmd, "diagnose": diagnose_cmd, "zoo": zoo_cmd,
            "bench": bench_cmd, "autoencoder": autoencoder_cmd,
            "extract": extract_cmd, "export": export_cmd, "plan": plan_cmd}


def user_errors() -> tuple[type[Exception], ...]:
    from moedit.config import ConfigError
    from moedit.data import DatasetError
    from moedit.diagnostics.record import DiagnosticsError
    from moedit.eval.features import FeatureClassifierError
    from moedit.eval.sampling import EvalError
    from moedit.train.checkpoint import CheckpointError
    from moedit.train.trainer import TrainingError
    from moedit.utils.files import PathError
    from moedit.utils.lock import LockedError
    from moedit.zoo.plan import ZooError

    return (ConfigError, DatasetError, CheckpointError, TrainingError, DiagnosticsError, EvalError,
            FeatureClassifierError, ZooError, PathError, LockedError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedit", description="Mixture-of-Experts Diffusion Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except user_errors() as exc:
        print(f"moedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system failure no earlier check caught (disk filled up mid-run, ...)
        from moedit.utils.files import describe_os_error

        print(f"moedit {args.command}: error: {describe_os_error(exc, 'read or write')}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # under torchrun: another rank died or hangs -> one clear line, not a traceback
        from moedit.distributed.setup import lost_peer_message

        message = lost_peer_message(exc)
        if message is None:
            raise
        print(f"moedit {args.command}: error: {message}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"moedit {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

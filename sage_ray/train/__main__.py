"""`python -m sage_ray.train CONFIG.yaml`: run one fine-tune job.

Against a running cluster: `ray job submit -- python -m sage_ray.train configs/finetune/x.yaml`.
Without one, a local Ray cluster starts for the run.
"""

from __future__ import annotations

import argparse
import signal
import sys

from sage_ray.config import load_train_config
from sage_ray.errors import SageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="fine-tune YAML (fields of sage_ray.TrainConfig)")
    parser.add_argument("--name", help="task id (overrides the config's name)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local cluster)")
    args = parser.parse_args(argv)
    from sage_ray.train.tracking import Cancelled
    from sage_ray.train.trainer import finetune

    signal.signal(signal.SIGTERM, _stop)
    try:
        cfg = load_train_config(args.config)
        if args.name:
            cfg.name = args.name
        result = finetune(cfg, address=args.address)
    except SageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Cancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 1
    print(f"task {result.task_id} completed: {result.model_path}")
    return 0


def _stop(signum, frame) -> None:
    """`ray job stop` (and so `sage finetune cancel`) sends SIGTERM: unwind through finetune()
    so the record says cancelled and Ray Train tears its workers down with this driver."""
    from sage_ray.train.tracking import Cancelled

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Cancelled("stopped (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())

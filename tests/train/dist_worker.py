"""`speedq-mlx` as one rank of a test run under `mlx.launch` (tests/test_distributed.py).

SPEEDQ_TEST_STOP_AT=NAME:STEP makes the process exit (code 3) right after rank 0 has
written the NAME checkpoint of STEP, i.e. an interruption at a known point, so the
test can resume it.
"""

import os
import sys

from speedq_mlx.train import loop as train_loop

stop = os.environ.get("SPEEDQ_TEST_STOP_AT")
if stop:
    name, at = stop.split(":")
    save = train_loop._save_checkpoint

    def save_then_stop(folder, ckpt_name, model, opt, step, extra):
        save(folder, ckpt_name, model, opt, step, extra)
        if ckpt_name == f"{name}_ckpt" and step == int(at):
            sys.stdout.flush()
            os._exit(3)

    train_loop._save_checkpoint = save_then_stop

from speedq_mlx.cli import main  # noqa: E402

main()

"""Helpers shared by the tests: the CLI run in-process, and a paragraph of English."""

from __future__ import annotations


def run_cli(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from speedq_mlx.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


ENGLISH_TEXT = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "fishing village on the banks of the river, and over the centuries it grew into a busy "
    "market town. Merchants came from far away to sell cloth, spices and wine, and the town "
    "built a large stone bridge so that carts could cross the water. Today the old streets are "
    "full of shops and cafes, and visitors come every summer to walk along the river and visit "
    "the museums. In the winter the town is quiet. Most of the people who live there work in "
    "the hospital, the schools or the small factories outside the centre, and on Sundays "
    "families walk in the hills above the valley, where the air is clean and the views are wide."
)


def quiet(*args, **kwargs) -> None:
    """A log that prints nothing."""


def make_run(ckpt, run_dir, resume: bool = False, log=quiet, **kw):
    """A speedq_mlx.run.Run for a checkpoint folder, as the pipeline opens one."""
    from speedq_mlx.run import Run

    return Run.open(ckpt, run_dir, resume, log=log, **kw)

"""``python -m transferlab.tracking replay <spool folder>``: send a run's records
that a silent tracking server could not take (the path is printed when a run
leaves records behind), final status included."""

from __future__ import annotations

import argparse

from transferlab.cli import guarded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transferlab.tracking", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send a spool folder's records to its run, then delete it")
    replay.add_argument("folders", nargs="+", help=".transferlab/spool/<run id> folder(s)")
    args = parser.parse_args(argv)

    def run() -> None:
        from transferlab.tracking.tracker import replay as replay_folder

        for folder in args.folders:
            replay_folder(folder)

    guarded(run)


if __name__ == "__main__":
    main()

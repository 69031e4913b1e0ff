"""``kmi``: the operator command.

Each subcommand is registered here and implemented beside the part of the
package it works on. Long work shows a progress bar on standard error and
ends with counts; every failure is one line on standard error and a
non-zero exit status, never a traceback.
"""
import argparse
import os
import sys

EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report in one line; ``status`` is the exit status."""

    def __init__(self, message, status=EXIT_FAILURE):
        super().__init__(message)
        self.status = status


def progress(iterable=None, total=None, what='items'):
    """A progress bar on standard error (tqdm) over ``iterable``."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, unit=' ' + what, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def make_parser():
    parser = argparse.ArgumentParser(
        prog='kmi', description='Operate a keas.kmi key store and the data encrypted with it.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    # Each module adds its subcommands; each sets `run` to a function of args.
    for register in _registrations():
        register(commands)
    return parser


def _registrations():
    from keas.kmi import keyadmin, migrate, storecopy
    return [keyadmin.register, storecopy.register, migrate.register]


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except CommandError as error:
        print('kmi: %s' % error, file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print('kmi: interrupted', file=sys.stderr)
        return 130
    except Exception as error:  # a bug, or a failure no command foresaw
        if os.environ.get('KMI_DEBUG'):
            raise
        print('kmi: %s failed: %s: %s (KMI_DEBUG=1 shows the traceback)'
              % (args.command, type(error).__name__, error), file=sys.stderr)
        return EXIT_FAILURE
    return status or 0


if __name__ == '__main__':
    # `python -m keas.kmi.cli`: run the imported module's main, so that the
    # subcommands' CommandError is the class main catches.
    from keas.kmi.cli import main as _main

    sys.exit(_main())

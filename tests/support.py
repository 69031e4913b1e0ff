"""Small helpers the test modules share."""
import hashlib
import os
import pathlib
import socket
import subprocess
import sys

CALL_TIMEOUT = 120

# The logging half of a test server's ini: the `kmi` log, with pids, on stderr.
LOGGING_INI = """\
[loggers]
keys = root, kmi

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console

[logger_kmi]
level = INFO
handlers =
qualname = kmi

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic

[formatter_generic]
format = %(process)d %(levelname)s [%(name)s] %(message)s
"""


# The operator command, run as a user would, by this interpreter; the test
# folder is on its path for the persistent classes of the test databases.
KMI = [sys.executable, '-m', 'keas.kmi.cli']
KMI_ENV = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parent))


def kmi(*args, check=False, env=None, timeout=600):
    """``kmi ARGS``: its CompletedProcess (text). ``check``: an
    AssertionError with its output unless it exits 0; ``env``: more variables."""
    result = subprocess.run(KMI + [str(a) for a in args], capture_output=True, text=True,
                            env=dict(KMI_ENV, **(env or {})), timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError('kmi %s: %s%s' % (args, result.stdout, result.stderr))
    return result


def md5hex(data):
    return hashlib.md5(data).hexdigest()


def free_port():
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def openssl(*args, cwd):
    subprocess.run(['openssl', *args], cwd=cwd, check=True, capture_output=True,
                   timeout=CALL_TIMEOUT)

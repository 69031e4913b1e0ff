"""Small helpers the test modules share."""
import hashlib
import socket
import subprocess

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

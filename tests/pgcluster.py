"""A throwaway PostgreSQL cluster for the tests and the benchmarks.

``Cluster(folder)`` runs initdb in ``folder`` and starts a server on a free
loopback port, its unix socket in the folder too, with TLS on (a test CA
made with the openssl command signs its certificate for localhost and
127.0.0.1). PostgreSQL refuses to run as root: as root, the folder is
given to the ``postgres`` user and every server command runs as that user.
Databases are reached as the superuser ``postgres`` (trust authentication
on loopback, so roles and grants are what the tests exercise).
"""
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time

from support import free_port
from support import openssl

CALL_TIMEOUT = 120


def find_bindir():
    """The directory holding initdb and pg_ctl, or None."""
    env = os.environ.get('KMI_PG_BINDIR')
    candidates = [env] if env else []

    def version(path):
        m = re.search(r'/postgresql/(\d+)/', path)
        return int(m.group(1)) if m else 0
    candidates += sorted(glob.glob('/usr/lib/postgresql/*/bin'), key=version, reverse=True)
    pg_ctl = shutil.which('pg_ctl')
    if pg_ctl:
        candidates.append(os.path.dirname(pg_ctl))
    for folder in candidates:
        if folder and all(os.access(os.path.join(folder, tool), os.X_OK)
                          for tool in ('initdb', 'pg_ctl', 'postgres')):
            return folder
    return None


def missing_reason():
    """Why a cluster cannot run here, or None."""
    if find_bindir() is None:
        return ('PostgreSQL server binaries (initdb, pg_ctl) not found; install '
                'postgresql (Debian: /usr/lib/postgresql/15/bin) or set KMI_PG_BINDIR')
    if shutil.which('openssl') is None:
        return 'the openssl command is needed for the test cluster certificates'
    if os.geteuid() == 0:
        try:
            pwd.getpwnam('postgres')
        except KeyError:
            return 'running as root and there is no postgres user to run PostgreSQL as'
        if shutil.which('runuser') is None:
            return 'running as root and runuser is missing'
    return None


def make_ca(folder, name='ca', subject='/CN=keas.kmi test database CA'):
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', subject,
            '-addext', 'basicConstraints=critical,CA:TRUE',
            '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
            '-keyout', name + '.key', '-out', name + '.crt', cwd=folder)
    return os.path.join(folder, name + '.crt')


def make_server_cert(folder, ca='ca', name='server'):
    with open(os.path.join(folder, name + '.ext'), 'w') as f:
        f.write('basicConstraints=critical,CA:FALSE\n'
                'keyUsage=critical,digitalSignature,keyEncipherment\n'
                'extendedKeyUsage=serverAuth\n'
                'subjectAltName=DNS:localhost,IP:127.0.0.1\n')
    openssl('req', '-new', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost',
            '-keyout', name + '.key', '-out', name + '.csr', cwd=folder)
    openssl('x509', '-req', '-in', name + '.csr', '-CA', ca + '.crt', '-CAkey', ca + '.key',
            '-set_serial', '2', '-days', '2', '-out', name + '.crt',
            '-extfile', name + '.ext', cwd=folder)
    return os.path.join(folder, name + '.crt'), os.path.join(folder, name + '.key')


class ClusterError(Exception):
    pass


class Cluster:
    """One PostgreSQL server of our own; ``stop()`` and ``start()`` it at will."""

    def __init__(self, folder=None, port=None):
        self.bindir = find_bindir()
        if self.bindir is None:
            raise ClusterError(missing_reason())
        self.as_root = os.geteuid() == 0
        self.folder = folder or tempfile.mkdtemp(prefix='kmi-pg-')
        self.data = os.path.join(self.folder, 'data')
        self.socket_dir = os.path.join(self.folder, 'sock')
        self.logfile = os.path.join(self.folder, 'postgres.log')
        self.pki = os.path.join(self.folder, 'pki')
        self.port = port or free_port()
        self.host = '127.0.0.1'
        os.makedirs(self.socket_dir, exist_ok=True)
        os.makedirs(self.pki, exist_ok=True)
        self.ca = make_ca(self.pki)
        cert, key = make_server_cert(self.pki)
        if self.as_root:
            entry = pwd.getpwnam('postgres')
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            for path in (self.folder, self.socket_dir):
                os.chown(path, self._uid, self._gid)
        self._server(['initdb', '-D', self.data, '-U', 'postgres', '-A', 'trust',
                      '-E', 'UTF8', '--locale=C', '--no-sync', '--no-instructions'])
        for src, name in ((cert, 'server.crt'), (key, 'server.key')):
            dst = os.path.join(self.data, name)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            if self.as_root:
                os.chown(dst, self._uid, self._gid)
        with open(os.path.join(self.data, 'postgresql.conf'), 'a') as f:
            f.write('\n# keas.kmi test cluster\n'
                    "listen_addresses = '127.0.0.1'\n"
                    'port = %d\n'
                    "unix_socket_directories = '%s'\n"
                    'max_connections = 300\n'
                    'shared_buffers = 32MB\n'
                    'ssl = on\n'
                    "ssl_cert_file = 'server.crt'\n"
                    "ssl_key_file = 'server.key'\n"
                    "log_min_messages = warning\n"
                    "log_line_prefix = '%%m [%%p] '\n" % (self.port, self.socket_dir))
        self._write_hba('')
        self.start()

    def _write_hba(self, first):
        with open(os.path.join(self.data, 'pg_hba.conf'), 'w') as f:
            f.write(first + 'local all all trust\n'
                    'host all all 127.0.0.1/32 trust\n')

    def set_hba(self, first):
        """Put ``first`` (pg_hba.conf lines) before the trust rules; reload."""
        self._write_hba(first)
        self.execute('SELECT pg_reload_conf()')
        time.sleep(1)  # the postmaster reloads on SIGHUP, asynchronously

    def _server(self, command):
        """Run a server program (as the postgres user when we are root)."""
        command = [os.path.join(self.bindir, command[0]), *command[1:]]
        if self.as_root:
            command = ['runuser', '-u', 'postgres', '--', *command]
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=CALL_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ClusterError('%s failed (%s):\n%s%s\n%s' % (
                ' '.join(command), done.returncode, done.stdout, done.stderr, self.log()))
        return done

    def log(self):
        try:
            with open(self.logfile, errors='replace') as f:
                return f.read()[-4000:]
        except OSError:
            return ''

    def start(self):
        if self.as_root and not os.path.exists(self.logfile):
            open(self.logfile, 'a').close()
            os.chown(self.logfile, self._uid, self._gid)
        self._server(['pg_ctl', '-D', self.data, '-l', self.logfile, '-w', '-t', '60', 'start'])

    def stop(self, mode='fast'):
        self._server(['pg_ctl', '-D', self.data, '-m', mode, '-w', '-t', '60', 'stop'])

    def running(self):
        return os.path.exists(os.path.join(self.data, 'postmaster.pid'))

    def destroy(self):
        try:
            if self.running():
                self.stop('immediate')
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # Clients --------------------------------------------------------------

    def url(self, dbname='postgres', user='postgres', **params):
        from urllib.parse import urlencode
        query = ('?' + urlencode(params)) if params else ''
        return 'postgresql://%s@%s:%d/%s%s' % (user, self.host, self.port, dbname, query)

    def connect(self, dbname='postgres', user='postgres'):
        import psycopg
        return psycopg.connect(host=self.host, port=self.port, dbname=dbname, user=user,
                               autocommit=True, connect_timeout=10, sslmode='disable')

    def execute(self, statement, params=None, dbname='postgres', user='postgres'):
        """Run one statement; its rows (if any)."""
        with self.connect(dbname, user) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else None

    def create_database(self, name, owner=None):
        from psycopg import sql
        statement = sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name))
        if owner:
            statement += sql.SQL(' OWNER {}').format(sql.Identifier(owner))
        self.execute(statement)
        return name

    def wait_until(self, up=True, seconds=60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.execute('SELECT 1')
                if up:
                    return
            except Exception:
                if not up:
                    return
            time.sleep(0.1)
        raise ClusterError('the cluster did not come %s' % ('up' if up else 'down'))

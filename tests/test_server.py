"""End to end: granian serving the key server over TLS on 127.0.0.1.

The servers are real processes, started the way `make serve` starts them
(`python -m keas.kmi.wsgi FILE.ini`, whose `[server:main]` says `use =
egg:keas.kmi#granian`), and, for those who run gunicorn, `gunicorn --paste`.
They are driven with wget and curl as the README does, with the testclient
command, with LocalKeyManagementFacility and over raw TLS sockets. A test CA,
made with the openssl command, signs the server and client certificates.
"""
import concurrent.futures
import http.client
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from keas.kmi import server as launcher
from keas.kmi.facility import KeyManagementFacility
from keas.kmi.facility import LocalKeyManagementFacility
from support import free_port
from support import LOGGING_INI
from support import md5hex
from support import openssl

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60  # seconds for a server to answer its first request
CALL_TIMEOUT = 60  # seconds for one command or request

pytestmark = [
    pytest.mark.skipif(shutil.which('openssl') is None, reason='needs the openssl command'),
    pytest.mark.skipif(importlib.util.find_spec('granian') is None,
                       reason='needs granian (the server or test extra)'),
]
needs_gunicorn = pytest.mark.skipif(importlib.util.find_spec('gunicorn') is None,
                                    reason='needs gunicorn (the test extra)')

# The ini a test server loads: the application and a `kmi` log with pids.
APP_INI = """\
[app:main]
use = egg:keas.kmi
storage-dir = {storage}

""" + LOGGING_INI


# Certificates -----------------------------------------------------------------

LEAF_EXTENSIONS = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = {usage}
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
{extra}
"""


def self_signed(folder, name, subject, *extra):
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
            '-subj', subject, '-keyout', name + '.key', '-out', name + '.crt', *extra,
            cwd=folder)
    return str(folder / (name + '.crt')), str(folder / (name + '.key'))


def signed_by_ca(folder, name, subject, usage, extra='', serial=2):
    (folder / (name + '.ext')).write_text(LEAF_EXTENSIONS.format(usage=usage, extra=extra))
    openssl('req', '-new', '-newkey', 'rsa:2048', '-nodes', '-subj', subject,
            '-keyout', name + '.key', '-out', name + '.csr', cwd=folder)
    openssl('x509', '-req', '-in', name + '.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
            '-set_serial', str(serial), '-days', '2', '-out', name + '.crt',
            '-extfile', name + '.ext', cwd=folder)
    return str(folder / (name + '.crt')), str(folder / (name + '.key'))


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost and a client one it signs,
    and a stranger: a self-signed pair nobody trusts."""
    folder = tmp_path_factory.mktemp('pki')
    ca, ca_key = self_signed(folder, 'ca', '/CN=keas.kmi test CA',
                             '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    server = signed_by_ca(folder, 'server', '/CN=localhost', 'serverAuth',
                          'subjectAltName = DNS:localhost,IP:127.0.0.1', serial=2)
    client = signed_by_ca(folder, 'client', '/CN=kmi test client', 'clientAuth', serial=3)
    stranger = self_signed(folder, 'stranger', '/CN=localhost',
                           '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1')
    return SimpleNamespace(dir=folder, ca=ca, server=server, client=client,
                           stranger=stranger)


def client_context(cafile, cert=None):
    context = ssl.create_default_context(cafile=cafile)
    if cert:
        context.load_cert_chain(*cert)
    return context


# Servers ----------------------------------------------------------------------


class Server:
    """One server process tree, started in its own session so that it can
    always be ended as a whole."""

    def __init__(self, command, folder, port, context, cwd=None, extra_env=None):
        self.command = command
        self.folder = folder
        self.port = port
        self.context = context
        self.url = 'https://localhost:%d' % port
        self.log_path = folder / 'server.log'
        runtime = folder / 'run'
        runtime.mkdir(exist_ok=True)
        env = dict(os.environ)
        for name in list(env):
            if name.startswith('GRANIAN_') or name in (
                    'GUNICORN_CMD_ARGS', 'WEB_CONCURRENCY', 'PORT'):
                env.pop(name)
        # gunicorn >= 25 opens a control socket there; keep each instance's apart.
        env['XDG_RUNTIME_DIR'] = str(runtime)
        env.update(extra_env or {})  # e.g. PYTHONPATH for a test's own filter
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen(
                command, cwd=cwd or folder, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def log(self):
        return self.log_path.read_text(errors='replace')

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail('the server exited with %s:\n%s'
                            % (self.process.returncode, self.log()))
            try:
                status, _ = self.request('GET', '/', timeout=5)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                pytest.fail('the server did not answer within %ds:\n%s'
                            % (START_TIMEOUT, self.log()))
            time.sleep(0.2)

    def request(self, method, path, body=None, context=None, timeout=CALL_TIMEOUT,
                headers=None):
        conn = http.client.HTTPSConnection('127.0.0.1', self.port, timeout=timeout,
                                           context=context or self.context)
        try:
            conn.request(method, path, body=body,
                         headers=headers or {'Content-Type': 'text/plain'})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path, body=b'', expect=200):
        status, data = self.request('POST', path, body)
        assert status == expect, (status, data)
        return data

    def stop(self):
        if self.process.poll() is None:
            # SIGINT: granian's (and gunicorn's) shutdown of the master and its workers.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(20)


def granian_section(port, certfile, keyfile, **settings):
    """A [server:main] for granian on 127.0.0.1:port with these TLS files."""
    settings = {'use': 'egg:keas.kmi#granian', 'host': '127.0.0.1', 'port': port,
                'ssl_certificate': certfile, 'ssl_keyfile': keyfile, **settings}
    lines = ['[server:main]'] + ['%s = %s' % item for item in settings.items()]
    return '\n'.join(lines) + '\n'


def kms(folder, pki, storage, **settings):
    """`python -m keas.kmi.wsgi` (what `make serve` runs) on a free port, with
    granian, the test CA's server certificate and ``settings``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ini = folder / 'kms.ini'
    ini.write_text(APP_INI.format(storage=storage) + '\n'
                   + granian_section(port, *pki.server, **settings))
    srv = Server([sys.executable, '-m', 'keas.kmi.wsgi', str(ini)], folder, port,
                 client_context(pki.ca, pki.client), cwd=REPO)
    srv.storage = Path(storage)
    return srv


def gunicorn(folder, pki, storage, workers=1, extra=()):
    """`python -m gunicorn --paste` with TLS given on the command line."""
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / 'kms.ini'
    ini.write_text(APP_INI.format(storage=storage))
    port = free_port()
    command = [
        sys.executable, '-m', 'gunicorn', '--paste', str(ini),
        '--bind', '127.0.0.1:%d' % port,
        '--certfile', pki.server[0], '--keyfile', pki.server[1],
        '--workers', str(workers), '--timeout', '120', *extra,
    ]
    return Server(command, folder, port, client_context(pki.ca, pki.client))


@pytest.fixture(scope='module')
def server(tmp_path_factory, pki):
    """granian with two workers over one storage directory."""
    folder = tmp_path_factory.mktemp('server')
    srv = kms(folder, pki, folder / 'keys', workers=2)
    yield srv
    srv.stop()


@pytest.fixture(scope='module')
def mtls_server(tmp_path_factory, pki):
    """A server that requires a client certificate signed by the test CA."""
    folder = tmp_path_factory.mktemp('mtls')
    srv = kms(folder, pki, folder / 'keys', ssl_ca=pki.ca, ssl_client_verify='true')
    yield srv
    srv.stop()


@pytest.fixture(scope='module')
def twins(tmp_path_factory, pki):
    """Two separate granian instances over one storage directory."""
    folder = tmp_path_factory.mktemp('twins')
    storage = folder / 'keys'
    first = kms(folder / 'a', pki, storage)
    try:
        second = kms(folder / 'b', pki, storage)
    except BaseException:
        first.stop()
        raise
    yield first, second
    second.stop()
    first.stop()


def make_serve_command(ini, port):
    """The command `make serve` runs, for another .ini file and port."""
    if shutil.which('make') is None:
        pytest.skip('needs make')
    dry_run = subprocess.run(
        ['make', '--no-print-directory', '-n', 'serve', 'PY=' + sys.executable,
         'SERVER_INI=' + str(ini), 'PORT=%d' % port],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=CALL_TIMEOUT)
    command = shlex.split(dry_run.stdout.strip().splitlines()[-1])
    assert command[:3] == [sys.executable, '-m', 'keas.kmi.wsgi'], command
    return command


def sample_pair(folder, pkcs1=False):
    """certs/sample.crt and .key in ``folder``, made as `make certs` makes them
    (or with the key in the PKCS#1 form older tools write), and ./sample.crt."""
    certs = folder / 'certs'
    certs.mkdir(parents=True, exist_ok=True)
    openssl('genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048',
            '-out', 'sample.key', cwd=certs)
    openssl('req', '-x509', '-key', 'sample.key', '-days', '2', '-subj', '/CN=localhost',
            '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-out', 'sample.crt',
            cwd=certs)
    if pkcs1:
        openssl('pkey', '-in', 'sample.key', '-traditional', '-out', 'pkcs1.key', cwd=certs)
        os.replace(certs / 'pkcs1.key', certs / 'sample.key')
    shutil.copy(certs / 'sample.crt', folder / 'sample.crt')
    return str(certs / 'sample.crt'), str(certs / 'sample.key')


def launch_like_make_serve(folder, ini_text=None, client_cert=None, pkcs1=False):
    """A copy of the repository's server.ini (or ``ini_text``) served by
    `make serve`'s command, with a sample certificate made the way `make
    certs` makes it, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / 'server.ini'
    ini.write_text(ini_text or (REPO / 'server.ini').read_text())
    crt, key = sample_pair(folder, pkcs1)
    port = free_port()
    command = make_serve_command(ini, port)
    return Server(command, folder, port, client_context(crt, client_cert), cwd=REPO)


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
    folder = tmp_path_factory.mktemp('launched')
    srv = launch_like_make_serve(folder)
    yield srv
    srv.stop()


# Tools ------------------------------------------------------------------------


def client_argv():
    script = Path(sys.executable).parent / 'testclient'
    if script.exists():
        return [str(script)]
    return [sys.executable, '-m', 'keas.kmi.testclient']


def run_testclient(*args, cwd):
    result = subprocess.run([*client_argv(), *map(str, args)], cwd=cwd,
                            capture_output=True, timeout=CALL_TIMEOUT)
    return result.returncode, result.stdout, result.stderr.decode()


def shell(command, cwd):
    """A README line, run by the shell as a person would type it."""
    env = dict(os.environ, PATH='%s%s%s' % (Path(sys.executable).parent, os.pathsep,
                                            os.environ.get('PATH', '')))
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True,
                          timeout=CALL_TIMEOUT)


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip('needs %s' % tool)


def wget_status(args, cwd):
    """Run wget with its server response shown; return (exit, HTTP status, stderr)."""
    need('wget')
    result = subprocess.run(['wget', '-S', '--content-on-error', '--tries=1', '--timeout=30',
                             *map(str, args)],
                            cwd=cwd, capture_output=True, timeout=CALL_TIMEOUT)
    err = result.stderr.decode(errors='replace')
    codes = re.findall(r'HTTP/1\.[01] (\d{3})', err)
    return result.returncode, int(codes[-1]) if codes else None, err


def curl(args, cwd):
    """Run curl; return (HTTP status, headers text, body bytes)."""
    need('curl')
    result = subprocess.run(
        ['curl', '-sS', '-D', 'headers.txt', '-o', 'body.bin', '-w', '%{http_code}',
         *map(str, args)], cwd=cwd, capture_output=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return (int(result.stdout), (cwd / 'headers.txt').read_text(),
            (cwd / 'body.bin').read_bytes())


def closed_port():
    return free_port()


def wait_for_log(srv, pattern, seconds=10):
    """The server log once it matches ``pattern`` (written by other processes)."""
    deadline = time.monotonic() + seconds
    while True:
        log = srv.log()
        if re.search(pattern, log) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


# The README, line by line, against `make serve`'s command ------------------------


def readme(line, port):
    return line.replace('https://localhost:8080', 'https://localhost:%d' % port)


def test_make_serve_command_serves_tls_on_the_configured_port(launched):
    context = ssl.create_default_context(cafile=str(launched.folder / 'sample.crt'))
    with socket.create_connection(('127.0.0.1', launched.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname='localhost') as tls:
            served = tls.getpeercert(binary_form=True)
    expected = ssl.PEM_cert_to_DER_cert((launched.folder / 'sample.crt').read_text())
    assert served == expected
    assert launched.request('GET', '/') == (200, b'KMS server holding 0 keys')


def test_make_serve_command_refuses_plain_http(launched):
    conn = http.client.HTTPConnection('127.0.0.1', launched.port, timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request('GET', '/')
        conn.getresponse().read()
    conn.close()


def test_make_serve_creates_a_private_key_storage(launched):
    storage = launched.folder / 'var' / 'keys'
    assert storage.is_dir()
    assert storage.stat().st_mode & 0o777 == 0o700


def test_readme_wget_calls(launched):
    need('wget')
    cwd = launched.folder
    new = shell(readme('wget https://localhost:8080/new -O kek.dat '
                       '--ca-certificate sample.crt --post-data=""', launched.port), cwd)
    assert new.returncode == 0, new.stderr
    kek = (cwd / 'kek.dat').read_bytes()
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    assert (cwd / 'var' / 'keys' / (md5hex(kek) + '.dek')).exists()

    key = shell(readme("wget https://localhost:8080/key --header 'Content-Type: text/plain' "
                       '--post-file kek.dat -O datakey.dat --ca-certificate sample.crt',
                       launched.port), cwd)
    assert key.returncode == 0, key.stderr
    dek = (cwd / 'datakey.dat').read_bytes()
    assert len(dek) == 128
    assert dek == KeyManagementFacility(str(cwd / 'var' / 'keys')).getEncryptionKey(kek)

    status = shell('wget -qO- https://localhost:%d/ --ca-certificate sample.crt'
                   % launched.port, cwd)
    assert status.stdout.startswith(b'KMS server holding ')


def test_readme_testclient_calls(launched):
    cwd = launched.folder / 'client'
    cwd.mkdir()
    shutil.copy(launched.folder / 'sample.crt', cwd)
    new = shell(readme('testclient https://localhost:8080 -n > kek.dat', launched.port), cwd)
    assert new.returncode == 0, new.stderr
    kek = (cwd / 'kek.dat').read_bytes()
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    get = shell(readme('testclient https://localhost:8080 -g kek.dat > datakey.dat',
                       launched.port), cwd)
    assert get.returncode == 0, get.stderr
    storage = launched.folder / 'var' / 'keys'
    assert (cwd / 'datakey.dat').read_bytes() == \
        KeyManagementFacility(str(storage)).getEncryptionKey(kek)


def test_one_log_line_per_key_event_with_name_and_address(launched):
    kek = launched.post('/new')
    launched.post('/key', kek)
    launched.post('/key', kek)  # from the cache, or unwrapped by the other worker
    name = md5hex(kek)
    log = wait_for_log(launched, r'(data key %s.*\n.*){2}' % name)
    lines = [line for line in log.splitlines() if name in line]
    assert len(lines) == 3, lines
    assert re.search(r'\[kmi\] created key %s for 127\.0\.0\.1$' % name, lines[0])
    for line in lines[1:]:
        assert re.search(r'\[kmi\] data key %s for 127\.0\.0\.1: sent$' % name, line)
    # The facility's own lines would repeat the events.
    assert 'New key added' not in log and 'Encryption key requested' not in log
    assert max(kek.splitlines(), key=len).decode() not in log
    assert 'PRIVATE KEY' not in log


def test_tls_1_2_clients_connect(launched, tmp_path):
    context = ssl.create_default_context(cafile=str(launched.folder / 'sample.crt'))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(('127.0.0.1', launched.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname='localhost') as tls:
            assert tls.version() == 'TLSv1.2'
    assert launched.request('GET', '/', context=context)[0] == 200
    status, _, body = curl(['--tlsv1.2', '--tls-max', '1.2', '--cacert',
                            launched.folder / 'sample.crt', launched.url + '/'], tmp_path)
    assert status == 200 and body.startswith(b'KMS server holding ')


def test_server_ini_settings():
    settings = launcher.server_settings(str(REPO / 'server.ini'))
    options = launcher.granian_options(settings)
    assert (options['address'], options['port']) == ('127.0.0.1', 8080)
    assert options['workers'] == 2 and options['blocking_threads'] >= 2
    assert options['ssl_cert'] == REPO / 'certs' / 'sample.crt'
    assert options['ssl_key'] == REPO / 'certs' / 'sample.key'
    assert options['ssl_protocol_min'] == 'tls1.2'
    assert 'ssl_ca' not in options and 'ssl_client_verify' not in options
    assert options['http1_settings']['header_read_timeout'] == 10000
    assert options['http1_settings']['keep_alive'] is True
    assert options['backlog'] >= 128 and options['backpressure'] >= 300
    assert options['http'] == '1' and options['respawn_failed_workers'] is True
    assert options['workers_kill_timeout'] == 10


def test_granian_options_defaults_and_errors(tmp_path):
    options = launcher.granian_options({'ssl-keyfile': 'k.pem', 'ssl_certificate': '/c.pem'},
                                       here=str(tmp_path))
    assert options['ssl_key'] == tmp_path / 'k.pem'  # relative to the file's folder
    assert options['ssl_cert'] == Path('/c.pem')
    assert options['ssl_protocol_min'] == 'tls1.2'  # granian's own default is 1.3
    for settings, message in [
            ({'threads': '4'}, 'unknown setting threads'),
            ({'port': 'http'}, 'port: '),
            ({'workers': '0'}, 'workers: 0 is below the minimum'),
            ({'http1_header_read_timeout': '90000'}, 'above the maximum, 60000'),
            ({'ssl_client_verify': 'maybe'}, 'neither true nor false'),
            ({'ssl_protocol_min': 'tls1.1'}, 'none of tls1.2, tls1.3')]:
        with pytest.raises(ValueError, match=re.escape(message)):
            launcher.granian_options(settings)


def test_pkcs1_to_pkcs8_is_the_same_key(tmp_path):
    crt, key = sample_pair(tmp_path, pkcs1=True)
    pkcs1 = Path(key).read_bytes()
    assert pkcs1.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    converted = tmp_path / 'converted.pem'
    converted.write_bytes(launcher.pkcs1_to_pkcs8(pkcs1))
    expected = subprocess.run(['openssl', 'pkey', '-in', key], capture_output=True,
                              check=True).stdout
    assert converted.read_bytes() == expected
    with pytest.raises(ValueError):
        launcher.pkcs1_to_pkcs8(b'-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n')


def test_launcher_serves_a_pkcs1_key_through_a_private_pkcs8_copy(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob('kmi-tls-*'))
    srv = launch_like_make_serve(tmp_path, pkcs1=True)
    try:
        assert srv.request('GET', '/')[0] == 200
        copies = set(Path(tempfile.gettempdir()).glob('kmi-tls-*')) - before
        assert len(copies) == 1
        (copy,) = copies
        assert copy.stat().st_mode & 0o777 == 0o700
        assert (copy / 'key.pem').stat().st_mode & 0o777 == 0o600
        assert (copy / 'key.pem').read_bytes().startswith(b'-----BEGIN PRIVATE KEY-----')
        assert 'is a PKCS#1 key' in srv.log()
    finally:
        srv.stop()
    assert not copy.exists(), 'the PKCS#8 copy outlived the server'


def run_launcher(ini, cwd):
    return subprocess.run([sys.executable, '-m', 'keas.kmi.wsgi', str(ini)], cwd=cwd,
                          capture_output=True, text=True, timeout=CALL_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def assert_one_line_exit(result, *words):
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if ' INFO ' not in line]
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]


def test_launcher_reports_a_missing_or_incomplete_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        launcher.main([str(tmp_path / 'missing.ini')])
    assert exit.value.code == 2
    ini = tmp_path / 'app-only.ini'
    ini.write_text('[app:main]\nuse = egg:keas.kmi\nstorage-dir = keys\n')
    with pytest.raises(SystemExit) as exit:
        launcher.main([str(ini)])
    assert exit.value.code == 1
    assert 'server' in capsys.readouterr().err


def test_launcher_errors_are_one_line(tmp_path, pki):
    """A missing certificate, an unknown setting, an EC key, a busy port: one
    line on standard error and exit status 1, never a traceback."""
    def ini(**settings):
        path = tmp_path / 'kms.ini'
        path.write_text(APP_INI.format(storage=tmp_path / 'keys') + '\n'
                        + granian_section(port, *pki.server, **settings))
        return path

    port = free_port()
    result = run_launcher(ini(ssl_certificate=tmp_path / 'missing.crt'), tmp_path)
    assert_one_line_exit(result, 'ssl_certificate', 'missing.crt', 'No such file')
    result = run_launcher(ini(threads='4'), tmp_path)
    assert_one_line_exit(result, 'unknown setting threads')
    openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'ec.key',
            cwd=tmp_path)
    result = run_launcher(ini(ssl_keyfile=tmp_path / 'ec.key'), tmp_path)
    assert_one_line_exit(result, 'ssl_keyfile', 'PKCS#8', 'openssl pkcs8 -topk8')
    result = run_launcher(ini(ssl_client_verify='true'), tmp_path)
    assert_one_line_exit(result, 'ssl_client_verify needs ssl_ca')
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', port))
        busy.listen()
        result = run_launcher(ini(), tmp_path)
    assert_one_line_exit(result, 'cannot listen on 127.0.0.1 port %d' % port)


def test_paste_deploy_loadserver_starts_granian(tmp_path, pki):
    port = free_port()
    ini = tmp_path / 'kms.ini'
    ini.write_text(APP_INI.format(storage=tmp_path / 'keys') + '\n'
                   + granian_section(port, *pki.server))
    code = ('import logging, sys\n'
            'from paste.deploy import loadapp, loadserver\n'
            'logging.basicConfig(level=logging.INFO)\n'
            'uri = "config:" + sys.argv[1]\n'
            'loadserver(uri)(loadapp(uri))\n')
    srv = Server([sys.executable, '-c', code, str(ini)], tmp_path, port,
                 client_context(pki.ca))
    try:
        kek = srv.post('/new')
        assert len(srv.post('/key', kek)) == 128
        assert 'Listening at: https://127.0.0.1:%d' % port in srv.log()
    finally:
        srv.stop()


def test_a_killed_worker_is_started_again(tmp_path, pki):
    srv = kms(tmp_path, pki, tmp_path / 'keys', workers=2)
    try:
        kek = srv.post('/new')
        workers = [int(pid) for pid in re.findall(r'Spawning worker-\d with PID: (\d+)',
                                                   srv.log())]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        wait_for_log(srv, r'Spawning worker-\d with PID: (?!%d|%d)\d+' % tuple(workers))
        time.sleep(1)
        for _ in range(10):  # connections reach both workers
            assert len(srv.post('/key', kek)) == 128
        assert srv.process.poll() is None
    finally:
        srv.stop()


def test_shutdown_is_not_held_by_a_body_that_never_ends(tmp_path, pki):
    srv = kms(tmp_path, pki, tmp_path / 'keys', workers_kill_timeout=2)
    with tls_connect(srv) as sock:
        sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\nab')
        time.sleep(0.5)
        started = time.monotonic()
        srv.process.send_signal(signal.SIGINT)
        srv.process.wait(30)
        assert time.monotonic() - started < 15
    srv.stop()
    assert 'Traceback' not in srv.log()


def test_launcher_honours_mutual_tls_lines_of_server_ini(tmp_path, pki):
    # What the README tells people to do: put the CA that signs the clients'
    # certificates in certs/ca.crt and uncomment two lines.
    text = (REPO / 'server.ini').read_text()
    text, count = re.subn(r'(?m)^# (ssl_ca|ssl_client_verify) = ', r'\1 = ', text)
    assert count == 2
    (tmp_path / 'certs').mkdir()
    shutil.copy(pki.ca, tmp_path / 'certs' / 'ca.crt')
    srv = launch_like_make_serve(tmp_path, text, client_cert=pki.client)
    try:
        assert srv.request('GET', '/')[0] == 200
        anonymous = client_context(str(tmp_path / 'sample.crt'))
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            srv.request('GET', '/', context=anonymous)
    finally:
        srv.stop()


def test_what_pip_installs():
    """`pip install keas.kmi gunicorn` is enough for `gunicorn --paste`
    (PasteDeploy comes with the package); granian is the server extra."""
    from importlib.metadata import entry_points, requires

    needs = requires('keas.kmi')
    plain = {re.split(r'[ ;<>=!\[]', r)[0].lower() for r in needs if 'extra ==' not in r}
    assert 'pastedeploy' in plain and 'granian' not in plain and 'gunicorn' not in plain
    assert any(r.lower().startswith('granian') and re.search(r'extra == .server.', r)
               for r in needs)
    (runner,) = [e for e in entry_points(group='paste.server_runner')
                 if e.name == 'granian' and e.dist.name == 'keas.kmi']
    assert runner.load() is launcher.server_runner


# gunicorn, for those who run it ---------------------------------------------------


@needs_gunicorn
def test_gunicorn_paste_with_the_readme_flags(tmp_path):
    """The README's gunicorn line: its own workers, TLS given on its command
    line (it ignores [server:main])."""
    ini = tmp_path / 'server.ini'
    ini.write_text((REPO / 'server.ini').read_text())
    crt, key = sample_pair(tmp_path)
    port = free_port()
    command = [sys.executable, '-m', 'gunicorn', '--paste', 'server.ini',
               '--bind', '127.0.0.1:%d' % port,
               '--certfile', 'certs/sample.crt', '--keyfile', 'certs/sample.key']
    srv = Server(command, tmp_path, port, client_context(crt))
    try:
        kek = srv.post('/new')
        assert srv.post('/key', kek) == KeyManagementFacility(
            str(tmp_path / 'var' / 'keys')).getEncryptionKey(kek)
        assert srv.request('GET', '/key')[0] == 405
        assert re.search(r'\[kmi\] created key %s for 127\.0\.0\.1' % md5hex(kek),
                         wait_for_log(srv, 'created key'))
    finally:
        srv.stop()


@needs_gunicorn
def test_gunicorn_paste_alone_serves_plain_http(tmp_path):
    """The trap the README warns of: without the flags, plain HTTP."""
    ini = tmp_path / 'server.ini'
    ini.write_text((REPO / 'server.ini').read_text())
    port = free_port()
    command = [sys.executable, '-m', 'gunicorn', '--paste', 'server.ini',
               '--bind', '127.0.0.1:%d' % port]
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
                conn.request('GET', '/')
                response = conn.getresponse()
                assert (response.status, response.read()) == (
                    200, b'KMS server holding 0 keys')
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(20)


# wget and curl: status codes ------------------------------------------------------


def test_wget_unknown_kek_is_404(server, pki, tmp_path):
    (tmp_path / 'unknown.dat').write_bytes(b'xxyz')
    code, status, err = wget_status(
        ['%s/key' % server.url, '--header', 'Content-Type: text/plain',
         '--post-file', 'unknown.dat', '-O', 'out.dat', '--ca-certificate', pki.ca], tmp_path)
    assert code != 0 and status == 404, err
    assert (tmp_path / 'out.dat').read_bytes() == b'Key not found'


def test_wget_get_new_is_405_and_creates_nothing(server, pki, tmp_path):
    before = len(os.listdir(server.storage))
    code, status, err = wget_status(['%s/new' % server.url, '-O', 'out.dat',
                                     '--ca-certificate', pki.ca], tmp_path)
    assert code != 0 and status == 405, err
    assert re.search(r'(?im)^ *allow: POST$', err), err
    assert len(os.listdir(server.storage)) == before


def test_curl_get_key_is_405_with_allow(server, pki, tmp_path):
    status, headers, body = curl(['--cacert', pki.ca, '%s/key' % server.url], tmp_path)
    assert status == 405
    assert re.search(r'(?im)^allow: POST\r?$', headers)


def test_curl_unknown_path_is_404(server, pki, tmp_path):
    status, headers, body = curl(['--cacert', pki.ca, '%s/nothing' % server.url], tmp_path)
    assert status == 404


def test_100_kib_body_is_413(server, pki, tmp_path):
    (tmp_path / 'big.dat').write_bytes(os.urandom(100 * 1024))
    status, headers, body = curl(['--cacert', pki.ca, '-H', 'Content-Type: text/plain',
                                  '--data-binary', '@big.dat', '%s/key' % server.url],
                                 tmp_path)
    assert status == 413
    code, status, err = wget_status(
        ['%s/key' % server.url, '--header', 'Content-Type: text/plain',
         '--post-file', 'big.dat', '-O', 'out.dat', '--ca-certificate', pki.ca], tmp_path)
    assert status == 413, err


def test_status_page_over_curl(server, pki, tmp_path):
    status, headers, body = curl(['--cacert', pki.ca, server.url + '/'], tmp_path)
    assert status == 200
    assert re.search(r'(?im)^content-type: text/plain\r?$', headers)
    assert re.fullmatch(rb'KMS server holding \d+ keys', body)


# Raw requests over TLS ---------------------------------------------------------------


def tls_connect(srv, timeout=10):
    raw = socket.create_connection(('127.0.0.1', srv.port), timeout=timeout)
    return srv.context.wrap_socket(raw, server_hostname='localhost')


def read_response(stream):
    """(status, headers, body) of one HTTP/1.x answer with a Content-Length."""
    status_line = stream.readline()
    assert re.match(rb'HTTP/1\.[01] ', status_line), status_line
    headers = {}
    while True:
        line = stream.readline().rstrip(b'\r\n')
        if not line:
            break
        name, _, value = line.decode('latin-1').partition(':')
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get('content-length', 0)))
    return int(status_line.split()[1]), headers, body


def exchange(srv, data, timeout=10):
    """Send ``data`` on a new connection; (status, everything received) once
    the server has closed it (None if it is still open after ``timeout``)."""
    with tls_connect(srv, timeout) as sock:
        sock.sendall(data)
        received = b''
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (socket.timeout, TimeoutError):
            return None, received
        except (ssl.SSLError, ConnectionResetError):
            pass
    match = re.match(rb'HTTP/1\.1 (\d{3}) ', received)
    return (int(match.group(1)) if match else 'closed'), received


@pytest.mark.parametrize('data', [
    b'GARBAGE\r\n\r\n',
    b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + b'\0' * 40 + b'\r\n\r\n',
    b'GET /\r\n\r\n',
    b'GET / HTTP/1.1 extra\r\n\r\n',
    b'GET / HTTP/2.0\r\n\r\n',
    b'GET / HTTP/1.1\r\nNo colon here\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost : x\r\n\r\n',
    b'GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n',
    b'GET / HTTP/1.1\r\nX: a\0b\r\n\r\n',
    b'GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n',
    b'POST /key HTTP/1.1\r\nContent-Length: -1\r\n\r\n',
    b'POST /key HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx',
    b'POST /key HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n',
    b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n',
    b'GET / HTTP/1.1\r\n' + b''.join(b'X-%d: y\r\n' % i for i in range(200)) + b'\r\n',
], ids=lambda data: repr(data[:24]))
def test_malformed_requests_get_4xx_and_a_closed_connection(server, data):
    status, received = exchange(server, data)
    assert isinstance(status, int) and 400 <= status < 500, (status, received[:200])
    assert re.search(rb'(?im)^connection: close\r$', received), received[:200]


def test_a_damaged_chunked_body_is_no_key(server):
    status, _ = exchange(server, b'POST /key HTTP/1.1\r\nHost: x\r\n'
                                 b'Transfer-Encoding: chunked\r\n\r\nzz\r\n')
    assert 400 <= status < 500


def test_oversize_bodies_are_413_declared_or_chunked(server):
    big = os.urandom(100 * 1024)
    status, received = exchange(server, b'POST /key HTTP/1.1\r\nHost: x\r\n'
                                        b'Content-Length: %d\r\n\r\n' % len(big) + big)
    assert status == 413, received[:200]
    chunked = b''.join(b'1000\r\n%s\r\n' % big[i:i + 4096] for i in range(0, len(big), 4096))
    status, received = exchange(server, b'POST /key HTTP/1.1\r\nHost: x\r\n'
                                        b'Transfer-Encoding: chunked\r\n\r\n' + chunked
                                        + b'0\r\n\r\n')
    assert status == 413, received[:200]
    # The limit is the body, not the connection: 60 KiB is an unknown key.
    assert server.request('POST', '/key', os.urandom(60 * 1024))[0] == 404


def test_keep_alive_chunked_bodies_and_expect_100_continue(server):
    kek = server.post('/new')
    dek = server.post('/key', kek)
    with tls_connect(server) as sock:
        stream = sock.makefile('rb')
        for _ in range(3):  # one connection, several requests
            sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s'
                         % (len(kek), kek))
            assert read_response(stream)[::2] == (200, dek)
        chunks = b''.join(b'%x\r\n%s\r\n' % (len(kek[i:i + 100]), kek[i:i + 100])
                          for i in range(0, len(kek), 100))
        sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                     + chunks + b'0\r\n\r\n')
        assert read_response(stream)[::2] == (200, dek)
        sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(kek))
        assert stream.readline() == b'HTTP/1.1 100 Continue\r\n'
        assert stream.readline() == b'\r\n'
        sock.sendall(kek)
        assert read_response(stream)[::2] == (200, dek)
        sock.sendall(b'GET / HTTP/1.0\r\n\r\n')
        status, headers, body = read_response(stream)
        assert status == 200 and body.startswith(b'KMS server holding ')


def test_head_and_unknown_methods(server):
    assert server.request('HEAD', '/') == (200, b'')
    status, received = exchange(server, b'DELETE /key HTTP/1.1\r\nHost: x\r\n'
                                        b'Connection: close\r\n\r\n')
    assert status == 405 and re.search(rb'(?im)^allow: POST\r$', received)


# testclient against the real server ----------------------------------------------


def test_testclient_every_option(server, pki, tmp_path):
    ca = ['--ca-certificate', pki.ca]
    code, out, err = run_testclient(server.url, *ca, cwd=tmp_path)
    assert code == 0, err
    assert re.fullmatch(rb'KMS server holding \d+ keys\n', out)

    code, kek, err = run_testclient(server.url, *ca, '-n', cwd=tmp_path)
    assert code == 0, err
    (tmp_path / 'kek.dat').write_bytes(kek)
    assert (server.storage / (md5hex(kek) + '.dek')).exists()

    code, dek, err = run_testclient(server.url, *ca, '-g', 'kek.dat', cwd=tmp_path)
    assert code == 0, err
    assert dek == KeyManagementFacility(str(server.storage)).getEncryptionKey(kek)

    (tmp_path / 'data.txt').write_bytes(b'the quick brown fox\n' * 1000)
    code, sealed, err = run_testclient(server.url, *ca, '-e', 'kek.dat', 'data.txt', cwd=tmp_path)
    assert code == 0, err
    assert sealed == KeyManagementFacility(str(server.storage)).encrypt(
        kek, (tmp_path / 'data.txt').read_bytes())
    (tmp_path / 'data.enc').write_bytes(sealed)
    code, plain, err = run_testclient(server.url, *ca, '-d', 'kek.dat', 'data.enc', cwd=tmp_path)
    assert code == 0, err
    assert plain == (tmp_path / 'data.txt').read_bytes()


def assert_one_line_error(err):
    assert err.startswith('testclient: '), err
    assert err.count('\n') == 1, err


def test_testclient_unknown_kek(server, pki, tmp_path):
    (tmp_path / 'unknown.dat').write_bytes(b'xxyz')
    code, out, err = run_testclient(server.url, '--ca-certificate', pki.ca, '-g', 'unknown.dat',
                                cwd=tmp_path)
    assert code == 3
    assert out == b''
    assert_one_line_error(err)
    assert '404' in err


def test_testclient_closed_port(pki, tmp_path):
    code, out, err = run_testclient('https://localhost:%d' % closed_port(),
                                '--ca-certificate', pki.ca, '-n', cwd=tmp_path)
    assert code == 1
    assert_one_line_error(err)


def test_testclient_untrusted_server(server, pki, tmp_path):
    code, out, err = run_testclient(server.url, '--ca-certificate', pki.stranger[0], '-n',
                                cwd=tmp_path)
    assert code == 1
    assert out == b''
    assert_one_line_error(err)
    assert 'certificate' in err


# LocalKeyManagementFacility --------------------------------------------------------


def test_local_facility_through_the_server(server, pki):
    local = LocalKeyManagementFacility(server.url, cafile=pki.ca)
    kek = local.generate()
    master = KeyManagementFacility(str(server.storage))
    assert local.getEncryptionKey(kek) == master.getEncryptionKey(kek)
    data = b'envelope' * 1000
    sealed = local.encrypt(kek, data)
    assert sealed == master.encrypt(kek, data)
    assert local.decrypt(kek, sealed) == data


def test_local_facility_with_an_ssl_context(server, pki):
    local = LocalKeyManagementFacility(server.url, ssl_context=client_context(pki.ca),
                                       connect_timeout=10.0, read_timeout=30.0)
    kek = local.generate()
    assert len(local.getEncryptionKey(kek)) == 128


def test_local_facility_refuses_an_untrusted_server(server, pki):
    local = LocalKeyManagementFacility(server.url, cafile=pki.stranger[0])
    with pytest.raises(OSError) as failure:
        local.generate()
    assert isinstance(failure.value.__cause__ or failure.value, ssl.SSLError)


def test_local_facility_unknown_kek_is_a_key_error(server, pki):
    local = LocalKeyManagementFacility(server.url, cafile=pki.ca)
    with pytest.raises(KeyError):
        local.getEncryptionKey(b'xxyz')


# Mutual TLS -------------------------------------------------------------------------


def test_mtls_refuses_a_client_without_certificate(mtls_server, pki, tmp_path):
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        mtls_server.request('POST', '/new', context=client_context(pki.ca))
    code, out, err = run_testclient(mtls_server.url, '--ca-certificate', pki.ca, '-n', cwd=tmp_path)
    assert code == 1 and out == b''
    assert_one_line_error(err)
    assert len(os.listdir(mtls_server.folder / 'keys')) == 0


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server, pki, tmp_path):
    code, out, err = run_testclient(mtls_server.url, '--ca-certificate', pki.ca,
                                '--cert', pki.stranger[0], '--key', pki.stranger[1], '-n',
                                cwd=tmp_path)
    assert code == 1 and out == b''
    assert_one_line_error(err)


def test_mtls_serves_a_client_with_a_ca_signed_certificate(mtls_server, pki, tmp_path):
    tls = ['--ca-certificate', pki.ca, '--cert', pki.client[0], '--key', pki.client[1]]
    code, kek, err = run_testclient(mtls_server.url, *tls, '-n', cwd=tmp_path)
    assert code == 0, err
    (tmp_path / 'kek.dat').write_bytes(kek)
    code, dek, err = run_testclient(mtls_server.url, *tls, '-g', 'kek.dat', cwd=tmp_path)
    assert code == 0, err
    assert len(dek) == 128
    local = LocalKeyManagementFacility(mtls_server.url, cafile=pki.ca,
                                       certfile=pki.client[0], keyfile=pki.client[1])
    assert local.getEncryptionKey(kek) == dek


def test_mtls_with_wget(mtls_server, pki, tmp_path):
    code, status, err = wget_status(['%s/' % mtls_server.url, '-O', 'status.txt',
                                     '--ca-certificate', pki.ca], tmp_path)
    assert code != 0 and status is None
    code, status, err = wget_status(['%s/' % mtls_server.url, '-O', 'status.txt',
                                     '--ca-certificate', pki.ca,
                                     '--certificate', pki.client[0],
                                     '--private-key', pki.client[1]], tmp_path)
    assert code == 0 and status == 200, err


# Scale-out --------------------------------------------------------------------------


def test_two_workers_serve_concurrent_clients(server):
    keys, threads = 12, 4
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        keks = list(pool.map(lambda _: server.post('/new'), range(keys)))
        deks = list(pool.map(lambda kek: server.post('/key', kek), keks))
    assert len(set(keks)) == keys
    assert all(len(dek) == 128 for dek in deks) and len(set(deks)) == keys
    time.sleep(0.5)
    creators = set(re.findall(r'(?m)^(\d+) INFO \[kmi\] created key', server.log()))
    assert len(creators) == 2, 'both workers should have created keys'


def test_two_instances_over_one_storage(twins):
    first, second = twins
    keys, threads = 20, 4

    def create_here_read_there(i):
        here, there = (first, second) if i % 2 else (second, first)
        kek = here.post('/new')
        dek = there.post('/key', kek)
        assert here.post('/key', kek) == dek
        return kek, dek

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(create_here_read_there, range(keys)))
    assert len({kek for kek, _ in results}) == keys
    assert all(len(dek) == 128 for _, dek in results)
    for srv in twins:
        assert srv.request('GET', '/') == (200, b'KMS server holding %d keys' % keys)


def test_rewrap_and_destroy_end_to_end_over_https(server, pki, tmp_path):
    """testclient -r over HTTPS; then the old KEK gets 410 while data in both
    formats reads with the new one; destroying the new key makes it 410 too;
    the audit log holds every step and verifies."""
    ca = ['--ca-certificate', pki.ca]
    local = LocalKeyManagementFacility(server.url, cafile=str(pki.ca),
                                       certfile=pki.client[0], keyfile=pki.client[1])
    old = local.generate()
    (tmp_path / 'old.kek').write_bytes(old)
    legacy = local.encrypt(old, b'data from before')
    local.dataFormat = 2
    v2 = local.encrypt(old, b'data from before', b'record 1')
    code, new, err = run_testclient(server.url, *ca, '-r', 'old.kek', cwd=tmp_path)
    assert code == 0 and new.startswith(b"-----BEGIN RSA PRIVATE KEY-----"), err
    (tmp_path / 'new.kek').write_bytes(new)
    # The worker that rewrapped forgets the old key at once; the other one,
    # which may have it cached, reads its state again within a second.
    time.sleep(1.5)
    assert server.post('/key', old, expect=410) == b'Key destroyed'
    code, _, err = run_testclient(server.url, *ca, '-g', 'old.kek', cwd=tmp_path)
    assert code == 1 and '410' in err
    fresh = LocalKeyManagementFacility(server.url, cafile=str(pki.ca),
                                       certfile=pki.client[0], keyfile=pki.client[1])
    assert fresh.decrypt(new, legacy) == b'data from before'
    assert fresh.decrypt(new, v2, b'record 1') == b'data from before'
    assert fresh.keyState(new) == 'active'
    master = KeyManagementFacility(str(server.storage))
    master.change_state(md5hex(new), 'deactivated', 'rotated out')
    time.sleep(1.5)  # the servers read key states again every second
    fresh.timeout = 0
    assert fresh.decrypt(new, legacy) == b'data from before'
    with pytest.raises(ValueError, match='deactivated'):
        fresh.encrypt(new, b'new data')
    master.change_state(md5hex(new), 'destroyed', 'data re-encrypted')
    time.sleep(1.5)
    assert server.post('/key', new, expect=410) == b'Key destroyed'
    assert not (server.storage / (md5hex(new) + '.dek')).exists()
    assert (server.storage / (md5hex(new) + '.meta')).exists()
    from keas.kmi.audit import FileAuditLog
    count, _, broken = FileAuditLog(str(server.storage / 'audit.jsonl')).verify()
    assert broken is None and count >= 8

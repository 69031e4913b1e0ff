"""The key server under load and faults (issue 6), on real gunicorn on 127.0.0.1.

Every server here is started the way `make serve` starts it (`python -m
keas.kmi.wsgi`), with the gunicorn settings of the repository's server.ini
(workers, worker class, threads, keepalive), so the documented configuration
is the one tested; only the address, the certificates and the key directory
are the test's own.

- many concurrent clients: no error, no lost key;
- a full key disk: 503, a clear log line, nothing partial left, recovery;
- slow clients (slowloris): normal clients are still served promptly.
"""
import hashlib
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# The certificate, process and request helpers of the end-to-end tests.
from test_server import APP_INI
from test_server import Server
from test_server import client_context
from test_server import free_port
from test_server import self_signed
from test_server import signed_by_ca

from keas.kmi import wsgi
from keas.kmi.facility import KeyManagementFacility

REPO = Path(__file__).resolve().parent.parent
PEM_START = b'-----BEGIN RSA PRIVATE KEY-----'
DEK_SIZE = 128

pytestmark = [
    pytest.mark.skipif(shutil.which('openssl') is None, reason='needs the openssl command'),
]


def md5hex(data):
    return hashlib.md5(data).hexdigest()


def ini_settings():
    """The gunicorn settings of the repository's server.ini."""
    return wsgi.server_settings(str(REPO / 'server.ini'))


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    """A CA and a server certificate for localhost and 127.0.0.1 it signs."""
    folder = tmp_path_factory.mktemp('pki')
    ca, _ = self_signed(folder, 'ca', '/CN=keas.kmi faults CA',
                        '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    server = signed_by_ca(folder, 'server', '/CN=localhost', 'serverAuth',
                          'subjectAltName = DNS:localhost,IP:127.0.0.1', serial=2)
    return ca, server


def launch(folder, pki, storage):
    """`python -m keas.kmi.wsgi` on a free loopback port with server.ini's
    gunicorn settings; its standard output and error go to folder/server.log."""
    ca, (certfile, keyfile) = pki
    folder.mkdir(parents=True, exist_ok=True)
    settings = ini_settings()
    for own in ('bind', 'certfile', 'keyfile', 'ca_certs', 'cert_reqs'):
        settings.pop(own, None)
    port = free_port()
    lines = ['[server:main]', 'use = egg:gunicorn#main', 'host = 127.0.0.1',
             'port = %d' % port, 'certfile = %s' % certfile, 'keyfile = %s' % keyfile]
    lines += ['%s = %s' % (name, value.replace('%', '%%'))
              for name, value in settings.items()]
    ini = folder / 'kms.ini'
    ini.write_text(APP_INI.format(storage=storage) + '\n' + '\n'.join(lines) + '\n')
    command = [sys.executable, '-m', 'keas.kmi.wsgi', str(ini)]
    srv = Server(command, folder, port, client_context(ca), cwd=REPO)
    srv.storage = Path(storage)
    srv.settings = settings
    return srv


def wait_for_log(srv, pattern, seconds=10):
    """The server log once it matches ``pattern`` (written by other processes)."""
    deadline = time.monotonic() + seconds
    while True:
        log = srv.log()
        if re.search(pattern, log) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def assert_healthy_log(log):
    assert 'Traceback' not in log, log
    assert 'WORKER TIMEOUT' not in log, log
    assert 'PRIVATE KEY' not in log


def test_server_ini_uses_event_workers():
    settings = ini_settings()
    assert settings['workers'] == '2'
    assert settings['worker_class'] == 'keas.kmi.worker.EventWorker'
    # The pool for application work (POST /new); slow clients hold no thread.
    assert int(settings['threads']) >= 2


# 1. Many concurrent clients -------------------------------------------------------

CLIENTS = 16
LOAD_SECONDS = 10  # clients start no request after this
MAX_REQUESTS_PER_CLIENT = 300
NEW_SHARE = 0.3  # the share of POST /new among the requests


@pytest.fixture
def load_server(tmp_path, pki):
    srv = launch(tmp_path / 'load', pki, tmp_path / 'load' / 'keys')
    yield srv
    srv.stop()


def test_concurrent_clients_get_no_errors_and_lose_no_keys(load_server):
    srv = load_server
    assert srv.settings['workers'] == '2'
    lock = threading.Lock()
    keks = []  # every KEK a POST /new answered, in order
    deks = {}  # KEK -> the first DEK POST /key answered for it
    errors = []
    counts = {'new': 0, 'key': 0, 'own': 0, 'other': 0}
    latencies = []
    deadline = time.monotonic() + LOAD_SECONDS

    def timed(path, body):
        start = time.monotonic()
        status, data = srv.request('POST', path, body, timeout=30)
        with lock:
            latencies.append(time.monotonic() - start)
        return status, data

    def client(number):
        rng = random.Random(number)
        mine = []
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            try:
                if not mine or rng.random() < NEW_SHARE:
                    status, kek = timed('/new', b'')
                    if status != 200 or not kek.startswith(PEM_START):
                        errors.append(('new', status, kek[:80]))
                        continue
                    mine.append(kek)
                    with lock:
                        keks.append(kek)
                        counts['new'] += 1
                    continue
                with lock:
                    own = rng.random() < 0.5 or len(keks) == len(mine)
                    kek = rng.choice(mine if own else keks)
                status, dek = timed('/key', kek)
                if status != 200 or len(dek) != DEK_SIZE:
                    errors.append(('key', status, dek[:80]))
                    continue
                with lock:
                    counts['key'] += 1
                    counts['own' if kek in mine else 'other'] += 1
                    first = deks.setdefault(kek, dek)
                if first != dek:
                    errors.append(('key', 'a second fetch gave another DEK', md5hex(kek)))
            except Exception as error:  # noqa: BLE001 - every failure is counted
                errors.append(('exception', repr(error)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 60)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), 'a client hung'
    latencies.sort()
    print('\n%d clients, %.1f s: %d POST /new, %d POST /key (%d for others\' keys), '
          '%d errors; latency median %.3f s, max %.3f s'
          % (CLIENTS, elapsed, counts['new'], counts['key'], counts['other'], len(errors),
             latencies[len(latencies) // 2], latencies[-1]))

    assert errors == []
    assert counts['new'] >= CLIENTS and counts['key'] >= CLIENTS
    assert counts['other'] > 0, 'no client read a key another one created'
    assert len(set(keks)) == len(keks)

    # No lost key: one complete .dek per created KEK, and nothing else.
    files = sorted(os.listdir(srv.storage))
    assert files == sorted(md5hex(kek) + '.dek' for kek in keks)
    master = KeyManagementFacility(str(srv.storage))
    for kek in keks:
        dek = master.getEncryptionKey(kek)
        assert len(dek) == DEK_SIZE
        assert deks.get(kek, dek) == dek
    assert srv.request('GET', '/') == (200, b'KMS server holding %d keys' % len(keks))
    assert_healthy_log(srv.log())


# 2. A full key disk -----------------------------------------------------------------

DISK_SIZE = '64k'
NO_SPACE_LINE = r'ERROR \[kmi\] cannot create a key for 127\.0\.0\.1: no space left'


def mount_tmpfs(mountpoint):
    if not sys.platform.startswith('linux') or shutil.which('mount') is None:
        pytest.skip('needs Linux and the mount command to make a small tmpfs')
    mountpoint.mkdir()
    result = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=%s,mode=0700' % DISK_SIZE, 'tmpfs',
         str(mountpoint)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip('mounting a %s tmpfs is not permitted here (needs root or '
                    'CAP_SYS_ADMIN): %s' % (DISK_SIZE, result.stderr.strip()))


def unmount(mountpoint):
    for command in (['umount', str(mountpoint)], ['umount', '-l', str(mountpoint)]):
        if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
            return


def fill(folder):
    """Write folder/filler until the file system is full; its size."""
    chunk = b'\0' * 4096
    with open(folder / 'filler', 'wb', buffering=0) as filler:
        for _ in range(10_000):  # 40 MB at most, far beyond the 64 KiB disk
            try:
                filler.write(chunk)
            except OSError as error:
                assert error.errno == 28, error  # ENOSPC
                break
        else:
            pytest.fail('the small disk never filled up')
        # Whatever is left is smaller than a page: bytes, one at a time.
        for _ in range(4096):
            try:
                filler.write(b'\0')
            except OSError:
                break
    return (folder / 'filler').stat().st_size


@pytest.fixture
def full_disk_server(tmp_path, pki):
    disk = tmp_path / 'disk'
    mount_tmpfs(disk)
    srv = None
    try:
        srv = launch(tmp_path / 'server', pki, disk / 'keys')
        srv.disk = disk
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        unmount(disk)


def test_full_disk_answers_503_and_leaves_nothing_behind(full_disk_server):
    srv = full_disk_server
    before = [srv.post('/new') for _ in range(2)]
    sizes = {md5hex(kek) + '.dek': (srv.storage / (md5hex(kek) + '.dek')).stat().st_size
             for kek in before}
    assert sorted(os.listdir(srv.storage)) == sorted(sizes)
    assert all(size > 0 for size in sizes.values())

    fill(srv.disk)
    # The precondition: not even a small file fits into the key directory now.
    probe = srv.storage / 'probe'
    with pytest.raises(OSError) as full:
        probe.write_bytes(b'\0' * 300)
    assert full.value.errno == 28
    probe.unlink(missing_ok=True)

    for _ in range(4):  # several, so that both workers are likely to meet it
        assert srv.request('POST', '/new', b'') == (503, b'Key storage is full')
    log = wait_for_log(srv, NO_SPACE_LINE)
    assert re.search(NO_SPACE_LINE + r' on the key storage \(.*No space left on device',
                     log), log
    assert_healthy_log(log)

    # Nothing partial: only the two complete keys, no temporaries, no empty files.
    assert sorted(os.listdir(srv.storage)) == sorted(sizes)
    for name, size in sizes.items():
        assert (srv.storage / name).stat().st_size == size
    master = KeyManagementFacility(str(srv.storage))
    assert all(len(master.getEncryptionKey(kek)) == DEK_SIZE for kek in before)
    assert srv.request('GET', '/') == (200, b'KMS server holding 2 keys')
    assert all(srv.post('/key', kek) == master.getEncryptionKey(kek) for kek in before)

    # Space again: keys can be created again.
    (srv.disk / 'filler').unlink()
    after = srv.post('/new')
    assert after.startswith(PEM_START)
    assert sorted(os.listdir(srv.storage)) == sorted([*sizes, md5hex(after) + '.dek'])
    assert srv.post('/key', after) == KeyManagementFacility(
        str(srv.storage)).getEncryptionKey(after)
    assert srv.request('GET', '/') == (200, b'KMS server holding 3 keys')


# 3. Slow clients ----------------------------------------------------------------------

SLOW_CLIENTS = 20  # TLS done, then the request line and headers a byte a second
IDLE_CLIENTS = 4  # connected, sending nothing at all
SLOW_SECONDS = 10
LATENCY_BOUND = 3.0  # seconds for one normal request while the slow ones hang
SLOW_REQUEST = b'POST /new HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nX-Slow: '


@pytest.fixture
def slow_server(tmp_path, pki):
    srv = launch(tmp_path / 'slow', pki, tmp_path / 'slow' / 'keys')
    yield srv
    srv.stop()


def test_slow_clients_do_not_delay_normal_ones(slow_server, pki):
    srv = slow_server
    context = client_context(pki[0])
    sockets = []
    try:
        for _ in range(IDLE_CLIENTS):
            sockets.append(socket.create_connection(('127.0.0.1', srv.port), timeout=5))
        slow = []
        for _ in range(SLOW_CLIENTS):
            raw = socket.create_connection(('127.0.0.1', srv.port), timeout=5)
            sockets.append(raw)
            slow.append(context.wrap_socket(raw, server_hostname='localhost'))
            sockets.append(slow[-1])

        stop = threading.Event()
        failures = []
        sent = [0]

        def trickle():
            # One byte per slow socket per second, for SLOW_SECONDS at most.
            for index in range(SLOW_SECONDS):
                for tls in slow:
                    try:
                        tls.sendall(SLOW_REQUEST[index:index + 1])
                    except OSError as error:
                        failures.append(repr(error))
                sent[0] = index + 1
                if stop.wait(1):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        latencies = []
        errors = []
        kek = b''
        ends = time.monotonic() + SLOW_SECONDS - 1
        try:
            for _ in range(100):  # bounded; the clock ends it first
                if time.monotonic() > ends:
                    break
                for method, path, body in (('GET', '/', None), ('POST', '/new', b''),
                                           ('POST', '/key', None)):
                    if path == '/key':
                        body = kek
                    start = time.monotonic()
                    try:
                        status, data = srv.request(method, path, body, timeout=15)
                    except Exception as error:  # noqa: BLE001 - every failure is counted
                        status, data = None, repr(error).encode()
                    latencies.append(time.monotonic() - start)
                    if status != 200:
                        errors.append((method, path, status, data[:80]))
                    elif path == '/new':
                        kek = data
                time.sleep(0.2)
        finally:
            stop.set()
            trickler.join(SLOW_SECONDS + 10)
        print('\n%d slow and %d idle connections for %ds: %d normal requests, %d errors; '
              'latency median %.3f s, max %.3f s'
              % (SLOW_CLIENTS, IDLE_CLIENTS, SLOW_SECONDS, len(latencies), len(errors),
                 sorted(latencies)[len(latencies) // 2], max(latencies)))
        assert errors == []
        assert len(latencies) >= 15, 'too few normal requests were made'
        assert max(latencies) < LATENCY_BOUND, sorted(latencies)[-5:]
        # The slow clients really were connected and sending all along.
        assert failures == []
        assert sent[0] >= SLOW_SECONDS - 1
    finally:
        for sock in sockets:
            sock.close()
    # Once they hang up, the server is fine.
    assert srv.request('GET', '/', timeout=15)[0] == 200
    assert_healthy_log(srv.log())

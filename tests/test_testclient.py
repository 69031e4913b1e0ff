"""The testclient command, run in-process against a server in a thread."""
import shutil
import socket
import ssl
import subprocess
import threading
import wsgiref.simple_server

import pytest

from keas.kmi import testclient
from keas.kmi import wsgi
from keas.kmi.facility import KeyManagementFacility


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


class ThreadServer:
    """A WSGI server on 127.0.0.1 in a daemon thread, optionally behind TLS."""

    def __init__(self, app, ssl_context=None):
        self.server = wsgiref.simple_server.make_server(
            '127.0.0.1', 0, app, handler_class=QuietHandler)
        self.server.timeout = 5
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        scheme = 'https' if ssl_context else 'http'
        self.url = '%s://localhost:%d' % (scheme, self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={'poll_interval': 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class Failing:
    """A facility that breaks on every call."""

    def __len__(self):
        raise RuntimeError('broken')

    def generate(self):
        raise RuntimeError('broken')

    def getEncryptionKey(self, kek):
        raise RuntimeError('broken')


@pytest.fixture(scope='module')
def master(tmp_path_factory):
    return KeyManagementFacility(str(tmp_path_factory.mktemp('keys')))


@pytest.fixture(scope='module')
def server(master):
    srv = ThreadServer(wsgi.KeyManagementApplication(master))
    yield srv
    srv.close()


@pytest.fixture(scope='module')
def kek(master):
    return master.generate()


@pytest.fixture
def kek_file(tmp_path, kek):
    path = tmp_path / 'kek.dat'
    path.write_bytes(kek)
    return str(path)


@pytest.fixture(scope='module')
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost, made like `make certs` does."""
    if shutil.which('openssl') is None:
        pytest.skip('needs the openssl command')
    folder = tmp_path_factory.mktemp('tls')
    crt, key = folder / 'sample.crt', folder / 'sample.key'
    subprocess.run(
        ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
         '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
         '-keyout', str(key), '-out', str(crt)],
        check=True, capture_output=True)
    return str(crt), str(key)


@pytest.fixture(scope='module')
def tls_server(master, tls_files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    srv = ThreadServer(wsgi.KeyManagementApplication(master), context)
    yield srv
    srv.close()


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(capsysbinary, *argv):
    status = testclient.main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


def assert_one_line_error(err):
    assert err.startswith('testclient: ')
    assert err.count('\n') == 1
    assert 'Traceback' not in err


# Success --------------------------------------------------------------------


def test_status(server, master, capsysbinary):
    status, out, err = run(capsysbinary, server.url)
    assert status == 0
    assert out == b'KMS server holding %d keys\n' % len(master)


def test_new_writes_a_kek_the_server_knows(server, master, capsysbinary):
    status, out, err = run(capsysbinary, server.url, '-n')
    assert status == 0
    assert out.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    assert out.endswith(b'-----END RSA PRIVATE KEY-----')
    assert len(master.getEncryptionKey(out)) == 128


def test_get_key_writes_the_raw_dek(server, master, kek, kek_file, capsysbinary):
    status, out, err = run(capsysbinary, server.url, '-g', kek_file)
    assert status == 0
    assert out == master.getEncryptionKey(kek)


def test_encrypt_and_decrypt_files(server, master, kek, kek_file, tmp_path, capsysbinary):
    plain = tmp_path / 'data.txt'
    plain.write_bytes(b'attack at dawn\n' * 100)
    status, encrypted, err = run(capsysbinary, server.url, '-e', kek_file, plain)
    assert status == 0, err
    assert encrypted == master.encrypt(kek, plain.read_bytes())
    sealed = tmp_path / 'data.enc'
    sealed.write_bytes(encrypted)
    status, out, err = run(capsysbinary, server.url, '-d', kek_file, sealed)
    assert status == 0, err
    assert out == plain.read_bytes()


def test_trusted_tls_server(tls_server, tls_files, kek, kek_file, master, capsysbinary):
    status, out, err = run(capsysbinary, tls_server.url, '--ca-certificate', tls_files[0],
                           '-g', kek_file)
    assert status == 0, err
    assert out == master.getEncryptionKey(kek)


def test_tls_encrypt_uses_the_same_trust(tls_server, tls_files, kek, kek_file, master,
                                         tmp_path, capsysbinary):
    plain = tmp_path / 'data.txt'
    plain.write_bytes(b'secret')
    status, out, err = run(capsysbinary, tls_server.url, '--ca-certificate', tls_files[0],
                           '-e', kek_file, plain)
    assert status == 0, err
    assert out == master.encrypt(kek, b'secret')


# Failure: one line on stderr, a non-zero status --------------------------------


def test_unknown_kek_exits_3(server, tmp_path, capsysbinary):
    unknown = tmp_path / 'unknown.dat'
    unknown.write_bytes(b'xxyz')
    status, out, err = run(capsysbinary, server.url, '-g', unknown)
    assert status == testclient.EXIT_NOT_FOUND
    assert out == b''
    assert_one_line_error(err)
    assert '404' in err and 'Key not found' in err


def test_unknown_kek_on_encrypt_fails(server, tmp_path, capsysbinary):
    unknown = tmp_path / 'unknown.dat'
    unknown.write_bytes(b'xxyz')
    status, out, err = run(capsysbinary, server.url, '-e', unknown, unknown)
    assert status != 0
    assert out == b''
    assert_one_line_error(err)


def test_closed_port_exits_1(capsysbinary):
    status, out, err = run(capsysbinary, 'http://127.0.0.1:%d' % closed_port(), '-n')
    assert status == 1
    assert out == b''
    assert_one_line_error(err)
    assert 'refused' in err


def test_sample_crt_in_the_working_directory_is_trusted(tls_server, tls_files, master,
                                                        monkeypatch, tmp_path, capsysbinary):
    # `make certs` copies its certificate to ./sample.crt, where the README runs testclient.
    (tmp_path / 'sample.crt').write_bytes(open(tls_files[0], 'rb').read())
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsysbinary, tls_server.url)
    assert status == 0, err
    assert out == b'KMS server holding %d keys\n' % len(master)


def test_untrusted_server_certificate_exits_1(tls_server, monkeypatch, tmp_path, capsysbinary):
    # Without --ca-certificate and ./sample.crt only the system store is
    # trusted, which does not know the server's certificate.
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsysbinary, tls_server.url, '-n')
    assert status == 1
    assert out == b''
    assert_one_line_error(err)
    assert 'TLS' in err and 'certificate' in err


def test_plain_http_to_a_tls_port_fails(tls_server, capsysbinary):
    status, out, err = run(capsysbinary, tls_server.url.replace('https:', 'http:'))
    assert status == 1
    assert_one_line_error(err)


def test_server_error_exits_1(capsysbinary):
    srv = ThreadServer(wsgi.KeyManagementApplication(Failing()))
    try:
        status, out, err = run(capsysbinary, srv.url, '-n')
    finally:
        srv.close()
    assert status == 1
    assert_one_line_error(err)
    assert '500' in err


def test_missing_kek_file(server, tmp_path, capsysbinary):
    status, out, err = run(capsysbinary, server.url, '-g', tmp_path / 'nope.dat')
    assert status == 1
    assert_one_line_error(err)
    assert 'nope.dat' in err


def test_missing_ca_file(capsysbinary, tmp_path):
    status, out, err = run(capsysbinary, 'https://localhost:1', '--ca-certificate',
                           tmp_path / 'none.crt')
    assert status == 1
    assert_one_line_error(err)


@pytest.mark.parametrize('url', ['localhost:8080', 'ftp://localhost/', 'https://'])
def test_bad_url(url, capsysbinary):
    status, out, err = run(capsysbinary, url)
    assert status == 1
    assert_one_line_error(err)


@pytest.mark.parametrize('argv', [
    [],
    ['http://localhost', '-e', 'kek.dat'],
    ['http://localhost', '-n', '-g', 'kek.dat'],
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        testclient.main(argv)
    assert exc.value.code == 2

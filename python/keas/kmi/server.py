"""Serve the key server with granian, configured by a PasteDeploy file's ``[server:main]``.

``server_runner`` is the ``paste.server_runner`` entry point ``egg:keas.kmi#granian``:
PasteDeploy's ``loadserver`` (and with it ``python -m keas.kmi.wsgi server.ini``,
what ``make serve`` runs) starts granian with the settings of that section. The
settings are named as granian's command line options (``granian --help``) with
underscores; ``granian_options`` turns them into the keyword arguments of
``granian.server.Server``, checking each, so that a mistake is one line at start.
"""
import argparse
import atexit
import base64
import configparser
import logging
import logging.config
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import tempfile
from pathlib import Path

log = logging.getLogger('kmi')

# Where this launcher's defaults differ from granian's, and why:
DEFAULTS = {
    'host': '127.0.0.1',
    'port': '8080',
    # wget, curl and older Python clients still speak TLS 1.2 (granian: 1.3).
    'ssl_protocol_min': 'tls1.2',
    # HTTP/1.1 only: then the header read timeout runs from the moment a
    # connection is accepted, so a client that connects and sends nothing is
    # closed too (with HTTP/2 detection, granian waits for it indefinitely).
    'http': '1',
    # A killed or crashed worker is started again, as gunicorn would.
    'respawn_failed_workers': 'true',
    # On SIGINT or SIGTERM, a worker still busy after this many seconds is
    # killed: a request whose body never ends would otherwise hold the
    # shutdown forever (granian waits without a limit).
    'workers_kill_timeout': '10',
}


def _whole(minimum=None, maximum=None):
    def parse(text):
        if not re.fullmatch(r'\s*\d+\s*', text):
            raise ValueError('%r is not a whole number' % text)
        value = int(text)
        if minimum is not None and value < minimum:
            raise ValueError('%d is below the minimum, %d' % (value, minimum))
        if maximum is not None and value > maximum:
            raise ValueError('%d is above the maximum, %d' % (value, maximum))
        return value
    return parse


def _flag(text):
    words = {'true': True, 'yes': True, 'on': True, '1': True,
             'false': False, 'no': False, 'off': False, '0': False}
    try:
        return words[text.strip().lower()]
    except KeyError:
        raise ValueError('%r is neither true nor false' % text) from None


def _choice(*choices):
    def parse(text):
        if text.strip() not in choices:
            raise ValueError('%r is none of %s' % (text, ', '.join(choices)))
        return text.strip()
    return parse


def _text(text):
    return text


def _path(text):
    return Path(text.strip())


def _paths(text):
    return [Path(item) for item in text.split()]


# [server:main] setting -> (parser, granian.server.Server argument). The
# http1_* settings go into granian.http.HTTP1Settings; the ranges are
# granian's own (`granian --help`).
SETTINGS = {
    'host': (_text, 'address'),
    'port': (_whole(0, 65535), 'port'),
    'workers': (_whole(1), 'workers'),
    'blocking_threads': (_whole(1), 'blocking_threads'),
    'runtime_threads': (_whole(1), 'runtime_threads'),
    'backlog': (_whole(128), 'backlog'),
    'backpressure': (_whole(1), 'backpressure'),
    'http': (_choice('auto', '1', '2'), 'http'),
    'http1_header_read_timeout': (_whole(1, 60000), 'header_read_timeout'),
    'http1_keep_alive': (_flag, 'keep_alive'),
    'http1_buffer_size': (_whole(8192), 'max_buffer_size'),
    'ssl_certificate': (_path, 'ssl_cert'),
    'ssl_keyfile': (_path, 'ssl_key'),
    'ssl_keyfile_password': (_text, 'ssl_key_password'),
    'ssl_protocol_min': (_choice('tls1.2', 'tls1.3'), 'ssl_protocol_min'),
    'ssl_ca': (_path, 'ssl_ca'),
    'ssl_crl': (_paths, 'ssl_crl'),
    'ssl_client_verify': (_flag, 'ssl_client_verify'),
    'access_log': (_flag, 'log_access'),
    'respawn_failed_workers': (_flag, 'respawn_failed_workers'),
    'workers_kill_timeout': (_whole(1, 1800), 'workers_kill_timeout'),
}
HTTP1 = {'header_read_timeout', 'keep_alive', 'max_buffer_size'}
PATHS = {'ssl_cert', 'ssl_key', 'ssl_ca'}


def granian_options(settings, here=None):
    """The ``granian.server.Server`` keyword arguments for the ``[server:main]``
    ``settings`` (strings, as PasteDeploy reads them); relative paths are
    taken from ``here``, the configuration file's folder. ValueError names
    the first setting that is wrong."""
    given = {name.replace('-', '_'): value for name, value in settings.items()}
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError('[server:main]: unknown setting %s (known: %s)'
                         % (', '.join(unknown), ', '.join(SETTINGS)))
    options, http1 = {}, {}
    for name, text in {**DEFAULTS, **given}.items():
        parse, argument = SETTINGS[name]
        try:
            value = parse(text)
        except ValueError as error:
            raise ValueError('[server:main] %s: %s' % (name, error)) from None
        if argument in PATHS and here and not value.is_absolute():
            value = Path(here) / value
        elif argument == 'ssl_crl' and here:
            value = [path if path.is_absolute() else Path(here) / path for path in value]
        (http1 if argument in HTTP1 else options)[argument] = value
    if http1:
        options['http1_settings'] = http1
    return options


# TLS files ------------------------------------------------------------------

# DER of the PKCS#8 AlgorithmIdentifier for rsaEncryption (1.2.840.113549.1.1.1, NULL).
_RSA_ALGORITHM = bytes.fromhex('300d06092a864886f70d0101010500')


def _der(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, 'big')
    return bytes([tag, 0x80 | len(length)]) + length + content


def pkcs1_to_pkcs8(pem):
    """An unencrypted PKCS#1 RSA key (``BEGIN RSA PRIVATE KEY``) as PKCS#8 PEM:
    the same key, wrapped in a PrivateKeyInfo."""
    body = re.search(rb'-----BEGIN RSA PRIVATE KEY-----(.*?)-----END RSA PRIVATE KEY-----',
                     pem, re.S)
    if body is None or b':' in body.group(1):
        raise ValueError('not an unencrypted PKCS#1 RSA key')
    pkcs1 = base64.b64decode(b''.join(body.group(1).split()), validate=True)
    info = _der(0x30, _der(0x02, b'\0') + _RSA_ALGORITHM + _der(0x04, pkcs1))
    encoded = base64.encodebytes(info).replace(b'\n', b'')
    lines = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
    return b'\n'.join([b'-----BEGIN PRIVATE KEY-----', *lines, b'-----END PRIVATE KEY-----', b''])


def _readable(setting, path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise ValueError('[server:main] %s: %s: %s'
                         % (setting, path, error.strerror or error)) from None


def _pkcs8_keyfile(path):
    """``path`` if it holds a PKCS#8 key, as granian needs; a PKCS#1 RSA key
    is converted into a private temporary file, removed when this process ends."""
    pem = _readable('ssl_keyfile', path)
    if b'-----BEGIN PRIVATE KEY-----' in pem or b'-----BEGIN ENCRYPTED PRIVATE KEY-----' in pem:
        return path
    convert = ('openssl pkcs8 -topk8 -in %s -out %s.pk8' % (path, path))
    if b'-----BEGIN RSA PRIVATE KEY-----' in pem and b'ENCRYPTED' not in pem:
        try:
            converted = pkcs1_to_pkcs8(pem)
        except ValueError as error:
            raise ValueError('[server:main] ssl_keyfile: %s: %s' % (path, error)) from None
        folder = tempfile.mkdtemp(prefix='kmi-tls-')  # mode 0700
        atexit.register(shutil.rmtree, folder, True)
        target = Path(folder) / 'key.pem'
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(converted)
        log.info('ssl_keyfile %s is a PKCS#1 key; serving a PKCS#8 copy of it '
                 '(to convert it once: %s -nocrypt)', path, convert)
        return target
    kind = re.search(rb'-----BEGIN ([A-Z0-9 ]+)-----', pem)
    raise ValueError(
        '[server:main] ssl_keyfile: %s holds %s; granian reads PKCS#8 keys only '
        '(convert it with: %s)'
        % (path, ('"%s"' % kind.group(1).decode()) if kind else 'no PEM key', convert))


def check_tls(options):
    """Check the TLS files of ``options`` the way granian will load them, so that
    a missing or unusable file is one line at start; PKCS#1 keys are converted."""
    cert, key = options.get('ssl_cert'), options.get('ssl_key')
    if not cert and not key:
        if options.get('ssl_ca') or options.get('ssl_client_verify'):
            raise ValueError('[server:main] ssl_ca and ssl_client_verify need '
                             'ssl_certificate and ssl_keyfile')
        return
    if not (cert and key):
        raise ValueError('[server:main] ssl_certificate and ssl_keyfile go together')
    _readable('ssl_certificate', cert)
    options['ssl_key'] = key = _pkcs8_keyfile(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), options.get('ssl_key_password'))
    except (ssl.SSLError, OSError) as error:
        raise ValueError('[server:main] ssl_certificate %s and ssl_keyfile %s cannot be '
                         'used together: %s' % (cert, key, error)) from None
    ca = options.get('ssl_ca')
    if ca:
        _readable('ssl_ca', ca)
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as error:
            raise ValueError('[server:main] ssl_ca %s: %s' % (ca, error)) from None
        if not options.get('ssl_client_verify'):
            log.warning('ssl_ca is set without ssl_client_verify = true: clients '
                        'without a certificate are served too')
    elif options.get('ssl_client_verify'):
        raise ValueError('[server:main] ssl_client_verify needs ssl_ca, the CA file '
                         'that signs the client certificates')
    for crl in options.get('ssl_crl') or ():
        _readable('ssl_crl', crl)


def check_port(address, port):
    """OSError if another process listens on the address. granian binds with
    SO_REUSEPORT, so a second server on a busy port would silently share its
    connections with the first instead of failing."""
    family = socket.AF_INET6 if ':' in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            raise OSError('cannot listen on %s port %d: %s'
                          % (address, port, error.strerror or error)) from None


# The server runner ----------------------------------------------------------


def _propagating_granian_logs():
    """granian's log configuration sending its lines to the handlers the
    configuration file gave the root logger, in that file's format."""
    return {
        'handlers': {},
        'loggers': {
            '_granian': {'handlers': [], 'propagate': True},
            'granian.access': {'handlers': [], 'propagate': True},
        },
    }


class _DeliberateThreads(logging.Filter):
    """granian warns when a worker may start more than two threads per core.
    Here that is deliberate (server.ini): granian has no time limit for
    request bodies, and a thread waiting for a slow client's body holds no
    GIL, so each connection may have one."""

    def filter(self, record):
        return 'Python threads, which seems quite high' not in record.getMessage()


def serve(app, options):
    """Run granian in the foreground with ``options`` (``granian_options``)
    until it is stopped (SIGINT or SIGTERM). Each worker is a fork of this
    process and serves its copy of ``app``."""
    try:
        from granian.constants import HTTPModes, Interfaces, SSLProtocols
        from granian.http import HTTP1Settings
        from granian.server import Server
    except ImportError:
        raise ValueError("granian is not installed: pip install 'keas.kmi[server]'") from None

    options = dict(options)
    check_tls(options)
    check_port(options['address'], options['port'])
    options['http'] = HTTPModes(options['http'])
    options['ssl_protocol_min'] = SSLProtocols(options['ssl_protocol_min'])
    if 'http1_settings' in options:
        options['http1_settings'] = HTTP1Settings(**options['http1_settings'])
    if 'fork' in multiprocessing.get_all_start_methods():
        # The application is built once, here; workers must inherit it.
        multiprocessing.set_start_method('fork', force=True)
    if logging.getLogger().handlers:
        options.setdefault('log_dictconfig', _propagating_granian_logs())
    server = Server(
        'keas.kmi.wsgi:KeyManagementApplication', interface=Interfaces.WSGI,
        websockets=False, **options)
    logging.getLogger('_granian').addFilter(_DeliberateThreads())
    server.serve(target_loader=lambda: app, wrap_loader=False)


def server_runner(wsgi_app, global_conf, **settings):
    """PasteDeploy ``paste.server_runner`` (``use = egg:keas.kmi#granian``)."""
    serve(wsgi_app, granian_options(settings, global_conf.get('here')))


# The launcher -----------------------------------------------------------------


def setup_logging(config_file):
    """The file's logging sections, as PasteDeploy's own ``pserve`` applies them."""
    parser = configparser.ConfigParser()
    parser.read(config_file)
    if parser.has_section('loggers'):
        here = os.path.dirname(config_file)
        logging.config.fileConfig(config_file, {'__file__': config_file, 'here': here},
                                  disable_existing_loggers=False)


def server_settings(config_file):
    """The ``[server:main]`` settings of ``config_file`` as PasteDeploy reads
    them: strings, with ``%(here)s`` filled in."""
    from paste.deploy import loadwsgi

    context = loadwsgi.loadcontext(loadwsgi.SERVER, 'config:' + os.path.abspath(config_file))
    return dict(context.local_conf)


def run(config_file, host=None, port=None):
    """The ``[app:main]`` of ``config_file`` served by its ``[server:main]``."""
    from paste.deploy import loadapp, loadwsgi

    config_file = os.path.abspath(config_file)
    uri = 'config:' + config_file
    setup_logging(config_file)
    context = loadwsgi.loadcontext(loadwsgi.SERVER, uri)
    if 'keas.kmi.worker' in context.local_conf.get('worker_class', ''):
        raise ValueError('[server:main] worker_class: keas.kmi.worker is gone; '
                         'use = egg:keas.kmi#granian serves the key server now (README.md)')
    if host:
        context.local_conf['host'] = host
    if port:
        context.local_conf['port'] = port
    server = context.create()
    app = loadapp(uri)
    server(app)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m keas.kmi.wsgi',
        description='Serve the key management server: the [app:main] section of a '
        'PasteDeploy file, with the server of its [server:main] section '
        '(use = egg:keas.kmi#granian: granian).')
    parser.add_argument('config', help='the .ini file, e.g. server.ini')
    parser.add_argument('--host', help='listen on this address instead')
    parser.add_argument('--port', help='listen on this port instead')
    args = parser.parse_args(argv)
    if not os.path.exists(args.config):
        parser.error('%s: no such file' % args.config)
    try:
        run(args.config, args.host, args.port)
    except (LookupError, ValueError, OSError, ImportError, configparser.Error) as error:
        # A broken file or section, a bad setting, a missing file, a busy port.
        parser.exit(1, '%s: %s\n' % (args.config, error))
    except KeyboardInterrupt:
        return 0
    return 0

"""The key management server as a WSGI application, and a launcher for it.

``application_factory`` is the PasteDeploy entry point (``egg:keas.kmi``): it
routes ``GET /``, ``POST /new`` and ``POST /key`` to the views in
``keas.kmi.rest`` and turns everything that goes wrong into a short plain-text
answer. ``python -m keas.kmi.wsgi server.ini`` serves it with gunicorn using the
``[server:main]`` settings of the file (what ``make serve`` runs).
"""
import argparse
import configparser
import errno
import logging
import os
import stat
import sys

from webob import Request
from webob import Response

from keas.kmi import _kmi, rest
from keas.kmi.store import StoreUnavailable, is_database_url, redact

log = logging.getLogger('kmi')

# What a client gets while the key store cannot be reached: retry shortly.
STORE_UNAVAILABLE = 'Key storage unavailable'
RETRY_AFTER = '2'

# The exit status when the key store cannot be opened at start: gunicorn's
# "App failed to load", which stops the server instead of restarting workers.
EXIT_STORE_FAILED = 4

# A KEK is a PEM-armoured RSA key: a few KiB even for 16384-bit keys.
MAX_KEK_SIZE = 64 * 1024


# The name the storage directory knows a KEK by: md5 hex of its bytes.
key_name = _kmi.kek_name


def _plain(status, text, headers=()):
    return Response(
        body=text.encode('ascii'),
        status=status,
        headerlist=[('Content-Type', 'text/plain'), *headers],
    )


class KeyManagementApplication:
    """Routes requests to the REST views of one facility."""

    # path -> (allowed methods, handler); HEAD is GET without the body.
    routes = {
        '/': (('GET', 'HEAD'), 'status'),
        '/new': (('POST',), 'create_key'),
        '/key': (('POST',), 'get_key'),
    }

    def __init__(self, facility, max_kek_size=MAX_KEK_SIZE):
        self.facility = facility
        self.max_kek_size = max_kek_size

    def inline_request(self, environ):
        """Whether an event-loop server (keas.kmi.worker) may answer this
        request on its loop thread rather than in its thread pool: only
        ``POST /key`` for a KEK whose DEK our facility has cached, which takes
        microseconds. Called once the body is read into ``wsgi.input``."""
        if environ.get('PATH_INFO') != '/key' or environ.get('REQUEST_METHOD') != 'POST':
            return False
        getvalue = getattr(environ.get('wsgi.input'), 'getvalue', None)
        facility = self.facility
        if getvalue is None or not getattr(facility, '_native', False):
            return False  # a facility of another kind may do I/O for any key
        return facility._core.is_cached(getvalue(), facility.timeout)

    def __call__(self, environ, start_response):
        if (environ.get('PATH_INFO') == '/key'
                and environ.get('REQUEST_METHOD') == 'POST'
                and environ.get('CONTENT_LENGTH')):
            return self.fast_key(environ, start_response)
        request = Request(environ)
        try:
            response = self.handle(request)
        except StoreUnavailable as error:
            log.error('%s %r from %s: %s', environ.get('REQUEST_METHOD'),
                      environ.get('PATH_INFO'), environ.get('REMOTE_ADDR'), error)
            response = _unavailable()
        except Exception:
            # The traceback goes to the log, never to the client.
            log.exception(
                'internal error on %s %r from %s', environ.get('REQUEST_METHOD'),
                environ.get('PATH_INFO'), environ.get('REMOTE_ADDR'),
            )
            response = _plain(500, 'Internal server error')
        return response(environ, start_response)

    def fast_key(self, environ, start_response):
        """``POST /key`` with a declared length, the request clients repeat,
        answered without building webob objects; the same answers as
        ``get_key``."""
        client = environ.get('REMOTE_ADDR')
        try:
            length = int(environ['CONTENT_LENGTH'])
        except ValueError:
            length = -1
        if not 0 <= length <= self.max_kek_size:
            log.warning('refused a key request from %s: body of %s bytes',
                        client, environ['CONTENT_LENGTH'])
            return _plain(413, 'Request body too large',
                          [('Connection', 'close')])(environ, start_response)
        kek = environ['wsgi.input'].read(length)
        status, body = self.answer_key(kek, client)
        headers = [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))]
        if status.startswith('503'):
            headers.append(('Retry-After', RETRY_AFTER))
        start_response(status, headers)
        return [body]

    def answer_key(self, kek, client):
        """(status, body) for a DEK request, logged by the KEK's name."""
        try:
            status, body, outcome = '200 OK', self.facility.getEncryptionKey(kek), 'sent'
        except KeyError:
            status, body, outcome = '404 Not Found', rest.KEY_NOT_FOUND.encode(), 'not found'
        except ValueError:
            status, body, outcome = '400 Bad Request', rest.INVALID_KEK.encode(), 'invalid KEK'
        except StoreUnavailable as error:
            log.error('data key for %s: %s', client, error)
            status, body, outcome = ('503 Service Unavailable', STORE_UNAVAILABLE.encode(),
                                     'key storage unavailable')
        except Exception:
            log.exception('internal error on POST /key from %s', client)
            status, body, outcome = '500 Internal Server Error', b'Internal server error', 'error'
        if log.isEnabledFor(logging.INFO):  # the md5 costs more than the lookup
            log.info('data key %s for %s: %s', key_name(kek), client, outcome)
        return status, body

    def handle(self, request):
        # The raw path (WSGI's latin-1 str): webob's path_info decodes it as
        # UTF-8 and raises on other bytes, which are no route of ours anyway.
        route = self.routes.get(request.environ.get('PATH_INFO', ''))
        if route is None:
            return _plain(404, 'Not found')
        methods, handler = route
        if request.method not in methods:
            return _plain(405, 'Method not allowed', [('Allow', ', '.join(methods))])
        return getattr(self, handler)(request)

    def status(self, request):
        return rest.get_status(self.facility, request)

    def create_key(self, request):
        try:
            response = rest.create_key(self.facility, request)
        except StoreUnavailable as error:
            # Nothing was handed out: the KEK is returned only once its DEK is stored.
            log.error('cannot create a key for %s: %s', request.remote_addr, error)
            return _unavailable()
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            log.error(
                'cannot create a key for %s: no space left on the key storage (%s)',
                request.remote_addr, error,
            )
            return _plain(503, 'Key storage is full')
        log.info('created key %s for %s', key_name(response.body), request.remote_addr)
        return response

    def get_key(self, request):
        kek = self.read_kek(request)
        if kek is None:
            log.warning(
                'refused a key request from %s: body larger than %d bytes',
                request.remote_addr, self.max_kek_size,
            )
            return _plain(413, 'Request body too large', [('Connection', 'close')])
        status, body = self.answer_key(kek, request.remote_addr)
        headers = [('Content-Type', 'text/plain')]
        if status.startswith('503'):
            headers.append(('Retry-After', RETRY_AFTER))
        return Response(body=body, status=status, headerlist=headers)

    def read_kek(self, request):
        """The request body, or None when it is longer than a KEK can be."""
        limit = self.max_kek_size
        body = request.body_file_raw
        length = request.content_length
        if length is not None:
            if length > limit:
                return None
            return body.read(length)
        if request.environ.get('wsgi.input_terminated'):
            # A chunked body: the server ends the stream, we cap the read.
            data = body.read(limit + 1)
            return None if len(data) > limit else data
        return b''


def _unavailable():
    return _plain(503, STORE_UNAVAILABLE, [('Retry-After', RETRY_AFTER)])


def make_storage_dir(path):
    """Create the key directory readable by its owner alone, or check it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning(
            'key storage %s is accessible to other users (mode %o)', path, mode
        )


# [app:main] settings for a database store, by their keas.kmi.pgstore names.
STORE_SETTINGS = ('schema', 'pool-min-size', 'pool-max-size', 'pool-timeout',
                  'statement-timeout')


def application_factory(global_config, **settings):
    """PasteDeploy ``paste.app_factory``: the server for ``storage-dir``, a
    directory or a PostgreSQL URL (with the optional ``STORE_SETTINGS``).

    When the key store cannot be opened (the database is unreachable, its
    schema cannot be brought up to date), the error is logged as one line
    and the process exits with status 4, which makes gunicorn stop rather
    than restart the worker."""
    from keas.kmi.facility import KeyManagementFacility

    try:
        storage_dir = settings['storage-dir']
    except KeyError:
        raise ValueError('keas.kmi: the setting storage-dir is required') from None
    options = {name.replace('-', '_'): settings[name]
               for name in STORE_SETTINGS if settings.get(name, '').strip()}
    if is_database_url(storage_dir):
        location = storage_dir
        shown = redact(location)
    else:
        if options:
            log.warning('ignoring %s: storage-dir is a directory, not a database',
                        ', '.join(sorted(n.replace('_', '-') for n in options)))
            options = {}
        location = shown = os.path.abspath(storage_dir)
    try:
        if not is_database_url(location):
            make_storage_dir(location)
        facility = KeyManagementFacility(location, **options)
    except (OSError, ValueError, ImportError) as error:
        # One line, no traceback: the operator fixes the database or the URL.
        message = str(error)
        if shown not in message:
            message = '%s: %s' % (shown, message)
        message = 'cannot open the key storage: ' + message
        if log.hasHandlers():
            log.critical('%s', message)
        else:
            print('keas.kmi: ' + message, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STORE_FAILED) from None
    log.info('key storage: %s', shown)
    return KeyManagementApplication(facility)


# The launcher ---------------------------------------------------------------
#
# `gunicorn --paste server.ini` reads only the application from the file and
# ignores [server:main] (address, TLS), and PasteDeploy's own server loading
# builds the application once in the master process before gunicorn forks.
# This launcher takes the gunicorn settings from [server:main] and lets each
# worker load the application, exactly as `gunicorn --paste` does.


def server_settings(config_file, host=None, port=None):
    """The gunicorn settings of the file's ``[server:main]`` section."""
    from paste.deploy import loadwsgi

    context = loadwsgi.loadcontext(loadwsgi.SERVER, 'config:' + config_file)
    settings = dict(context.local_conf)
    # gunicorn's own PasteDeploy runner turns host and port into bind, too.
    host = host or settings.pop('host', None)
    port = port or settings.pop('port', None)
    for name in ('host', 'port'):
        settings.pop(name, None)
    if host and port:
        settings['bind'] = '%s:%s' % (host, port)
    elif host or port:
        raise ValueError('[server:main] needs both host and port')
    return settings


def has_logging_config(config_file):
    parser = configparser.ConfigParser()
    parser.read(config_file)
    return parser.has_section('loggers')


def serve(config_file, host=None, port=None):
    """Run gunicorn in the foreground with the settings in ``config_file``."""
    from gunicorn.app.base import BaseApplication
    from paste.deploy import loadapp

    config_file = os.path.abspath(config_file)
    settings = server_settings(config_file, host, port)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set('default_proc_name', 'kmi: ' + config_file)
            if has_logging_config(config_file):
                self.cfg.set('logconfig', config_file)
            for name, value in settings.items():
                self.cfg.set(name.lower().replace('-', '_'), value)

        def load(self):
            return loadapp('config:' + config_file)

    Server().run()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m keas.kmi.wsgi',
        description='Serve the key management server with gunicorn, using the '
        '[app:main] and [server:main] sections of a PasteDeploy file.',
    )
    parser.add_argument('config', help='the .ini file, e.g. server.ini')
    parser.add_argument('--host', help='listen on this address instead')
    parser.add_argument('--port', help='listen on this port instead')
    args = parser.parse_args(argv)
    if not os.path.exists(args.config):
        parser.error('%s: no such file' % args.config)
    try:
        serve(args.config, args.host, args.port)
    except (AttributeError, LookupError, ValueError) as error:
        # Unknown gunicorn settings or a broken [server:main] section.
        parser.exit(1, '%s: %s\n' % (args.config, error))


if __name__ == '__main__':
    # Run the imported module's main, not a second copy of this file's code.
    from keas.kmi.wsgi import main as _main

    sys.exit(_main())

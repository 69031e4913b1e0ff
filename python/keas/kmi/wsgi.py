"""The key management server as a WSGI application.

``application_factory`` is the PasteDeploy entry point (``egg:keas.kmi``): it
routes ``GET /``, ``POST /new``, ``POST /key``, ``POST /rewrap`` and
``GET``/``PUT /wrapped/<name>`` to the views in ``keas.kmi.rest`` and turns
everything that goes wrong into a short plain-text answer. ``python -m
keas.kmi.wsgi server.ini`` (what ``make serve`` runs) serves it with the
server of the file's ``[server:main]``: granian, through ``keas.kmi.server``.
"""
import errno
import logging
import os
import stat
import sys

from webob import Request
from webob import Response

from keas.kmi import _kmi, lifecycle, rest
from keas.kmi.audit import AuditError, requester
from keas.kmi.facility import logged_by_server
from keas.kmi.store import StoreUnavailable, is_database_url, redact

log = logging.getLogger('kmi')

# What a client gets while the key store cannot be reached: retry shortly.
STORE_UNAVAILABLE = 'Key storage unavailable'
RETRY_AFTER = '2'
# ... and while the audit log cannot be written: the request is refused.
AUDIT_UNAVAILABLE = 'Audit log unavailable'

# The exit status when the key store cannot be opened at start: gunicorn's
# "App failed to load", which stops the server instead of restarting workers.
EXIT_STORE_FAILED = 4

# A KEK is a PEM-armoured RSA key: a few KiB even for 16384-bit keys.
MAX_KEK_SIZE = 64 * 1024

# A body over MAX_KEK_SIZE is still read, and dropped, up to this size before
# the 413 goes out: a server that closes a connection with request bytes
# unread makes the kernel reset it, and a client still sending its body
# (wget does) may then lose the answer.
DRAIN_LIMIT = 1024 * 1024


def _drain(stream, size):
    while size > 0:
        chunk = stream.read(min(size, 64 * 1024))
        if not chunk:
            return
        size -= len(chunk)


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
        '/rewrap': (('POST',), 'rewrap_key'),
    }

    def __init__(self, facility, max_kek_size=MAX_KEK_SIZE, client_address_header=None,
                 client_subject_header=None):
        self.facility = facility
        self.max_kek_size = max_kek_size
        # Set only behind a TLS-terminating proxy that overwrites these headers.
        self.address_key = _environ_key(client_address_header)
        self.subject_key = _environ_key(client_subject_header)

    def requester(self, environ):
        """Who asks, for the log and the audit log: the client's address, and
        the certificate subject a trusted proxy passed on."""
        address = environ.get(self.address_key) if self.address_key else None
        subject = environ.get(self.subject_key) if self.subject_key else None
        return {'client': address or environ.get('REMOTE_ADDR'), 'subject': subject}

    def __call__(self, environ, start_response):
        # This application logs each key event itself, with the client's
        # address; the facility's own line for it would say it twice.
        token = logged_by_server.set(True)
        who = requester.set(self.requester(environ))
        try:
            return self.respond(environ, start_response)
        finally:
            requester.reset(who)
            logged_by_server.reset(token)

    def respond(self, environ, start_response):
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
        except AuditError as error:
            # Fail closed: what cannot be logged is not done.
            log.error('%s %r from %s refused: %s', environ.get('REQUEST_METHOD'),
                      environ.get('PATH_INFO'), environ.get('REMOTE_ADDR'), error)
            response = _plain(503, AUDIT_UNAVAILABLE, [('Retry-After', RETRY_AFTER)])
        except Exception:
            # The traceback goes to the log, never to the client.
            log.exception(
                'internal error on %s %r from %s', environ.get('REQUEST_METHOD'),
                environ.get('PATH_INFO'), environ.get('REMOTE_ADDR'),
            )
            response = _plain(500, 'Internal server error')
        if _is_wrapped(environ.get('PATH_INFO', '')) \
                and rest.API_HEADER not in response.headers:
            # Errors too: the client tells our 503 from an old server's answer.
            response.headerlist.append((rest.API_HEADER, rest.API_VERSION))
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
            if length <= DRAIN_LIMIT:
                _drain(environ['wsgi.input'], length)
            self.audit_refusal('fetch', 'refused: body too large')
            return _plain(413, 'Request body too large',
                          [('Connection', 'close')])(environ, start_response)
        kek = environ['wsgi.input'].read(length)
        if len(kek) < length:
            return self.incomplete(client, len(kek), length)(environ, start_response)
        status, body, headers = self.answer_key(kek, client)
        headers = [('Content-Type', 'text/plain'), ('Content-Length', str(len(body))),
                   *headers]
        start_response(status, headers)
        return [body]

    def audit_refusal(self, event, outcome):
        """Log a refused request that names no key; best effort, as the
        answer is a refusal anyway."""
        try:
            self.facility.audit(event, None, outcome)
        except (AuditError, StoreUnavailable, AttributeError) as error:
            log.error('cannot write the audit log: %s', error)

    @staticmethod
    def incomplete(client, received, length):
        """A body that ended early (the client went away): no key request."""
        log.warning('refused a key request from %s: the body ended after %d of %d bytes',
                    client, received, length)
        return _plain(400, 'Incomplete request body', [('Connection', 'close')])

    def answer_key(self, kek, client):
        """(status, body, headers) for a DEK request, logged by the KEK's name
        and written to the audit log before it is answered."""
        headers = []
        kid = name = None
        try:
            code, body, headers, outcome, kid, name = rest.answer_key(self.facility, kek)
            status = STATUS_LINES[code]
        except StoreUnavailable as error:
            log.error('data key for %s: %s', client, error)
            status, body, outcome = ('503 Service Unavailable', STORE_UNAVAILABLE.encode(),
                                     'key storage unavailable')
            headers = [('Retry-After', RETRY_AFTER)]
        except Exception:
            log.exception('internal error on POST /key from %s', client)
            status, body, outcome = '500 Internal Server Error', b'Internal server error', 'error'
        auditing = getattr(self.facility, 'auditing', False)
        if name is None and (auditing or log.isEnabledFor(logging.INFO)):
            name = key_name(kek)  # the md5 costs more than the lookup
        if auditing:
            try:
                self.facility.audit('fetch', name, outcome, kid)
            except (AuditError, StoreUnavailable) as error:
                # Fail closed: a DEK whose fetch cannot be logged is not sent.
                log.error('data key %s for %s refused: %s', name, client, error)
                text = AUDIT_UNAVAILABLE if isinstance(error, AuditError) else STORE_UNAVAILABLE
                return ('503 Service Unavailable', text.encode(),
                        [('Retry-After', RETRY_AFTER)])
        if name is not None:
            log.info('data key %s for %s: %s', name, client,
                     'sent' if outcome == 'ok' else outcome)
        return status, body, headers

    def handle(self, request):
        # The raw path (WSGI's latin-1 str): webob's path_info decodes it as
        # UTF-8 and raises on other bytes, which are no route of ours anyway.
        path = request.environ.get('PATH_INFO', '')
        route = self.routes.get(path)
        if route is None:
            if _is_wrapped(path):
                return self.wrapped_key(request, path)
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
            if error.errno != errno.ENOSPC or isinstance(error, AuditError):
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
        status, body, headers = self.answer_key(kek, request.remote_addr)
        return Response(body=body, status=status,
                        headerlist=[('Content-Type', 'text/plain'), *headers])

    def rewrap_key(self, request):
        kek = self.read_kek(request)
        if kek is None:
            self.audit_refusal('rewrap', 'refused: body too large')
            return _plain(413, 'Request body too large', [('Connection', 'close')])
        request.body = kek  # read once, within the limit; the view reads it again
        try:
            response = rest.rewrap_key(self.facility, request)
        except OSError as error:
            if error.errno != errno.ENOSPC or isinstance(error, AuditError):
                raise
            log.error('cannot rewrap a key for %s: no space left on the key storage (%s)',
                      request.remote_addr, error)
            return _plain(503, 'Key storage is full')
        if response.status_code == 200:
            log.info('rewrapped key %s as %s for %s', key_name(kek),
                     key_name(response.body), request.remote_addr)
        else:
            log.info('rewrap of key %s for %s: %s', key_name(kek), request.remote_addr,
                     response.status)
            self.audit_refusal('rewrap', 'refused: %s' % response.status)
        return response

    def wrapped_key(self, request, path):
        """``GET``/``PUT /wrapped/<name>``: a wrapped DEK, returned or stored
        as it is (no KEK involved), logged by name and audited first."""
        method = request.method
        name = path[len(rest.WRAPPED_PATH):]
        body = b''
        if method == 'PUT':
            body = self.read_kek(request)
            if body is None:
                log.warning('refused to store a wrapped key for %s: body larger than %d bytes',
                            request.remote_addr, self.max_kek_size)
                length = request.content_length
                if length is not None and length <= DRAIN_LIMIT:
                    _drain(request.body_file_raw, length)  # so the client reads the 413
                self.audit_refusal('put', 'refused: body too large')
                return _plain(413, 'Request body too large', [('Connection', 'close')])
            if request.content_length is not None and len(body) < request.content_length:
                return self.incomplete(request.remote_addr, len(body), request.content_length)
        code, body, headers, event, outcome = rest.answer_wrapped(
            self.facility, method, name, body, request.headers)
        if event is not None:
            shown = name if rest.valid_name(name) else '(invalid name)'
            if event == 'put':
                log.info('wrapped key %s from %s: %s', shown, request.remote_addr,
                         'stored' if code == 201 else outcome)
            else:
                log.info('wrapped key %s for %s: %s', shown, request.remote_addr,
                         'sent' if outcome == 'ok' else outcome)
        return rest.wrapped_response(code, body, headers, method)

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
            if len(data) <= limit:
                return data
            _drain(body, DRAIN_LIMIT - len(data))
            return None
        return b''


STATUS_LINES = {200: '200 OK', 400: '400 Bad Request', 403: '403 Forbidden',
                404: '404 Not Found', 410: '410 Gone'}


def _is_wrapped(path):
    return path.startswith(rest.WRAPPED_PATH) or path == rest.WRAPPED_PATH.rstrip('/')


def _environ_key(header):
    """The WSGI environ key of an HTTP request header name."""
    if not header:
        return None
    return 'HTTP_' + header.strip().upper().replace('-', '_')


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
                  'statement-timeout', 'audit-spool')


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
        audit_log = settings.get('audit-log', '').strip()
        if audit_log:
            if is_database_url(location):
                raise ValueError('audit-log names a file, for a directory store; a '
                                 'database keeps its audit log in a table')
            options['audit_log'] = os.path.abspath(audit_log)
        facility = KeyManagementFacility(
            location, audit=_flag(settings.get('audit', 'on'), 'audit'), **options)
        facility.deactivateAfter = lifecycle.parse_period(settings.get('deactivate-after'))
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
    return KeyManagementApplication(
        facility,
        client_address_header=settings.get('client-address-header', '').strip() or None,
        client_subject_header=settings.get('client-subject-header', '').strip() or None)


def _flag(value, name):
    text = str(value).strip().lower()
    if text in ('on', 'true', 'yes', '1'):
        return True
    if text in ('off', 'false', 'no', '0'):
        return False
    raise ValueError('%s must be on or off, not %r' % (name, value))


if __name__ == '__main__':
    # `python -m keas.kmi.wsgi server.ini`: the launcher of keas.kmi.server.
    from keas.kmi.server import main

    sys.exit(main())

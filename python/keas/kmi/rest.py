"""The REST views of the master key management facility.

Each view takes the facility (``context``) and a ``webob.Request`` and returns
a response; ``keas.kmi.wsgi`` routes requests to them, and they can equally be
called directly, as the package documentation does.

``GET`` and ``PUT /wrapped/<name>`` (``wrapped_key``, docs/protocol.md) store
and return wrapped DEKs that clients make and open themselves: the server
never sees their KEKs.
"""
import errno
import re

from webob import Response
from webob import exc

from keas.kmi._kmi import KeyExistsError
from keas.kmi.audit import AuditError
from keas.kmi.lifecycle import KEY_STATE_HEADER, KeyStateError

__all__ = ['get_status', 'create_key', 'get_key', 'rewrap_key', 'wrapped_key']

# Clients compare these bodies, so they are part of the API (FORMATS.md, 5).
KEY_NOT_FOUND = 'Key not found'
INVALID_KEK = 'Invalid key encrypting key'

# What a key in each refusing state answers.
REFUSALS = {
    'suspended': (403, 'Key suspended'),
    'compromised': (403, 'Key compromised'),
    'destroyed': (410, 'Key destroyed'),
}


def _plain(body, status=200):
    # An explicit header list keeps the Content-Type free of a charset, as
    # the original server sent it.
    return Response(
        body=body, status=status, headerlist=[('Content-Type', 'text/plain')]
    )


def _plain_error(error_class, message):
    # The webob HTTP errors print as their detail alone, which is what the
    # package documentation shows for a missing key; giving them a body makes
    # them send that text instead of webob's HTML page.
    return error_class(
        message,
        body=message.encode('ascii'),
        headerlist=[('Content-Type', 'text/plain')],
    )


def get_status(context, request):
    """``GET /``: a one-line status page."""
    return _plain(('KMS server holding %d keys' % len(context)).encode('ascii'))


def create_key(context, request):
    """``POST /new``: a new key encrypting key, as the PEM text the facility made."""
    return _plain(context.generate())


def answer_key(context, kek):
    """``POST /key`` as ``(status code, body, headers, outcome, kid, name)``:
    the DEK of ``kek``, or why not (``outcome`` says so in the audit log);
    kid and name when the facility gives them cheaply, else None."""
    kid = name = None
    try:
        if getattr(context, '_native', False):
            dek, state, kid, name = context._core.dek_and_state(context, kek)
        else:
            dek, state = context.getEncryptionKey(kek), None
    except KeyStateError as refused:
        code, text = REFUSALS.get(refused.state, (403, 'Key refused'))
        return (code, text.encode(), [(KEY_STATE_HEADER, refused.state)], refused.state,
                None, None)
    except KeyError:
        return 404, KEY_NOT_FOUND.encode(), [], 'not found', None, None
    except ValueError:
        # A known name but a KEK that cannot be read: the client's mistake.
        return 400, INVALID_KEK.encode(), [], 'invalid KEK', None, None
    return 200, dek, [(KEY_STATE_HEADER, state)] if state else [], 'ok', kid, name


def _refused(code, body, headers):
    error = {404: exc.HTTPNotFound, 400: exc.HTTPBadRequest, 403: exc.HTTPForbidden,
             410: exc.HTTPGone}[code]
    response = _plain_error(error, body.decode('ascii'))
    response.headerlist.extend(headers)
    return response


def get_key(context, request):
    """``POST /key``: the data encrypting key belonging to the KEK in the body."""
    code, body, headers, _, _, _ = answer_key(context, request.body)
    if code != 200:
        return _refused(code, body, headers)
    response = _plain(body)
    response.headerlist.extend(headers)
    return response


def rewrap_key(context, request):
    """``POST /rewrap``: a new KEK for the DEK of the KEK in the body; the old
    entry is destroyed, or with ``?grace=SECONDS`` deactivated until then."""
    grace = request.GET.get('grace')
    try:
        grace = float(grace) if grace else None
        if grace is not None and not 0 < grace < 10 * 365 * 86400:
            raise ValueError(grace)
    except ValueError:
        return _refused(400, b'grace must be a number of seconds', [])
    try:
        return _plain(context.rewrap(request.body, grace=grace))
    except KeyStateError as refused:
        code, text = REFUSALS.get(refused.state, (403, 'Key refused'))
        return _refused(code, text.encode(), [(KEY_STATE_HEADER, refused.state)])
    except KeyError:
        return _refused(404, KEY_NOT_FOUND.encode(), [])
    except ValueError:
        return _refused(400, INVALID_KEK.encode(), [])


# Wrapped keys (docs/protocol.md) ------------------------------------------------

WRAPPED_PATH = '/wrapped/'
# Every answer under /wrapped/ carries this header, so that a client can tell
# "no such key" (404 with it) from "a server without the endpoint" (without).
API_HEADER = 'X-KMI-API'
API_VERSION = '2'
# What a client may say about the key it stores; the server cannot check it.
KID_HEADER = 'X-KMI-Kid'
FINGERPRINT_HEADER = 'X-KMI-KEK-Fingerprint'

# A wrapped DEK is one RSA PKCS#1 v1.5 block: as long as the KEK's modulus,
# 512 to 16384 bits (the largest KEK this package reads).
MIN_WRAPPED = 64
MAX_WRAPPED = 2048
# Bodies are read up to this size (as a KEK for /key); longer ones are 413.
MAX_BODY = 64 * 1024
WRAPPED_METHODS = ('GET', 'HEAD', 'PUT')

INVALID_NAME = 'Invalid key name: 32 lowercase hex digits, the md5 of the KEK'
KEY_EXISTS = 'Key exists: another wrapped DEK is stored under this name; keys are written once'
KEY_NAME_DESTROYED = 'Key destroyed: its name is not used again'

_NAME = re.compile(r'[0-9a-f]{32}\Z')
_KID = re.compile(r'[0-9a-fA-F]{32}\Z')
_FINGERPRINT = re.compile(r'[0-9a-fA-F]{64}\Z')
# Printable ASCII and white space: what PEM, base64, hex and other text are made of.
_TEXT = bytes(range(0x20, 0x7f)) + b'\t\r\n'


def valid_name(name):
    """Whether ``name`` can name a key: the md5 hex digest of a KEK."""
    return isinstance(name, str) and _NAME.match(name) is not None


def check_wrapped(body):
    """Why ``body`` cannot be a wrapped DEK, or None if it may be one.

    Without the KEK the server can check only the shape of an RSA
    ciphertext: its length, and that it is neither trivial (0 or 1, which
    encrypt to themselves) nor text. A KEK sent by mistake is text (PEM);
    random bytes of 64 or more are all printable with a probability under
    2**-80."""
    if not MIN_WRAPPED <= len(body) <= MAX_WRAPPED:
        return ('a wrapped DEK is one RSA block of %d to %d bytes, not %d bytes'
                % (MIN_WRAPPED, MAX_WRAPPED, len(body)))
    if not body.translate(None, _TEXT):
        if b'PRIVATE KEY' in body:
            return 'that is a private key, not a wrapped DEK: the KEK never goes to the server'
        return 'that is text, not an RSA ciphertext'
    if int.from_bytes(body, 'big') <= 1:
        return 'that is not an RSA ciphertext (its value is %d)' % int.from_bytes(body, 'big')
    return None


def _audit(context, event, name, outcome, kid=None):
    audit = getattr(context, 'audit', None)
    if audit is not None:
        audit(event, name, outcome, kid)


def answer_wrapped(context, method, name, body=b'', headers=None):
    """A ``/wrapped/<name>`` request as ``(status code, body, headers, event,
    outcome)``, written to the facility's audit log (``fetch`` or ``put``)
    before it is answered; ``AuditError`` when that cannot be done. The
    headers always include ``API_HEADER``."""
    headers = headers or {}
    event = 'put' if method == 'PUT' else 'fetch'
    api = [(API_HEADER, API_VERSION)]
    if method not in WRAPPED_METHODS:
        return (405, b'Method not allowed', api + [('Allow', ', '.join(WRAPPED_METHODS))],
                None, None)
    if not valid_name(name):
        _audit(context, event, None, 'refused: invalid name')
        return 400, INVALID_NAME.encode(), api, event, 'refused: invalid name'
    if method == 'PUT':
        return _put_wrapped(context, name, body, headers, api)
    try:
        wrapped, state, kid = context.wrapped(name)
    except KeyStateError as refused:
        code, text = REFUSALS.get(refused.state, (403, 'Key refused'))
        _audit(context, event, name, refused.state)
        return code, text.encode(), api + [(KEY_STATE_HEADER, refused.state)], event, \
            refused.state
    except KeyError:
        _audit(context, event, name, 'not found')
        return 404, KEY_NOT_FOUND.encode(), api, event, 'not found'
    _audit(context, event, name, 'ok', kid)
    return (200, wrapped, api + [(KEY_STATE_HEADER, state)], event, 'ok')


def _header(headers, name):
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value.strip()
    return None


def _put_wrapped(context, name, body, headers, api):
    def refused(code, text, outcome):
        _audit(context, 'put', name, 'refused: ' + outcome)
        return code, text.encode(), api, 'put', 'refused: ' + outcome

    if len(body) > MAX_BODY:
        return refused(413, 'Request body too large', 'body too large')
    kid = _header(headers, KID_HEADER)
    fingerprint = _header(headers, FINGERPRINT_HEADER)
    if kid is not None and not _KID.match(kid):
        return refused(400, '%s must be 32 hex digits' % KID_HEADER, 'invalid kid')
    if fingerprint is not None and not _FINGERPRINT.match(fingerprint):
        return refused(400, '%s must be 64 hex digits' % FINGERPRINT_HEADER,
                       'invalid fingerprint')
    problem = check_wrapped(body)
    if problem is not None:
        return refused(400, 'Not a wrapped DEK: ' + problem, 'not a wrapped DEK')
    kid = kid.lower() if kid else None
    fingerprint = fingerprint.lower() if fingerprint else None
    try:
        created, state = context.add_wrapped(name, body, kid, fingerprint)
    except KeyStateError:
        return refused(409, KEY_NAME_DESTROYED, 'destroyed')
    except KeyExistsError:
        return refused(409, KEY_EXISTS, 'exists')
    except OSError as error:
        if error.errno != errno.ENOSPC or isinstance(error, AuditError):
            raise
        # Nothing was stored; the store logged the failure after its promise.
        return 503, b'Key storage is full', api, 'put', 'failed: no space left'
    headers = api + [(KEY_STATE_HEADER, state)]
    if created:
        return 201, b'Stored', headers, 'put', 'ok'
    # The same bytes again: a client whose answer was lost retries.
    _audit(context, 'put', name, 'ok: already stored', kid)
    return 200, b'Already stored', headers, 'put', 'ok: already stored'


def wrapped_response(code, body, headers, method='GET'):
    """The webob response for an ``answer_wrapped`` result."""
    content_type = 'application/octet-stream' if code == 200 and method != 'PUT' \
        else 'text/plain'
    status = '%d %s' % (code, STATUS_REASONS.get(code, ''))
    return Response(body=body, status=status,
                    headerlist=[('Content-Type', content_type), *headers])


STATUS_REASONS = {200: 'OK', 201: 'Created', 400: 'Bad Request', 403: 'Forbidden',
                  404: 'Not Found', 405: 'Method Not Allowed', 409: 'Conflict',
                  410: 'Gone', 413: 'Request Entity Too Large',
                  503: 'Service Unavailable'}


def wrapped_key(context, request):
    """``GET`` / ``PUT /wrapped/<name>``: the wrapped DEK stored under
    ``name``, or store one that a client made (docs/protocol.md)."""
    path = request.environ.get('PATH_INFO', '')
    name = path[len(WRAPPED_PATH):] if path.startswith(WRAPPED_PATH) else ''
    body = request.body if request.method == 'PUT' else b''
    code, body, headers, _, _ = answer_wrapped(
        context, request.method, name, body, dict(request.headers))
    return wrapped_response(code, body, headers, request.method)

"""The REST views of the master key management facility.

Each view takes the facility (``context``) and a ``webob.Request`` and returns
a response; ``keas.kmi.wsgi`` routes requests to them, and they can equally be
called directly, as the package documentation does.
"""
from webob import Response
from webob import exc

from keas.kmi.lifecycle import KEY_STATE_HEADER, KeyStateError

__all__ = ['get_status', 'create_key', 'get_key', 'rewrap_key']

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
    """``POST /key`` as ``(status code, body, headers, outcome, kid)``: the
    DEK of ``kek``, or why not (``outcome`` says so in the audit log)."""
    kid = None
    try:
        if getattr(context, '_native', False):
            dek, state, kid = context._core.dek_and_state(context, kek)
        else:
            dek, state = context.getEncryptionKey(kek), None
    except KeyStateError as refused:
        code, text = REFUSALS.get(refused.state, (403, 'Key refused'))
        return code, text.encode(), [(KEY_STATE_HEADER, refused.state)], refused.state, None
    except KeyError:
        return 404, KEY_NOT_FOUND.encode(), [], 'not found', None
    except ValueError:
        # A known name but a KEK that cannot be read: the client's mistake.
        return 400, INVALID_KEK.encode(), [], 'invalid KEK', None
    return 200, dek, [(KEY_STATE_HEADER, state)] if state else [], 'ok', kid


def _refused(code, body, headers):
    error = {404: exc.HTTPNotFound, 400: exc.HTTPBadRequest, 403: exc.HTTPForbidden,
             410: exc.HTTPGone}[code]
    response = _plain_error(error, body.decode('ascii'))
    response.headerlist.extend(headers)
    return response


def get_key(context, request):
    """``POST /key``: the data encrypting key belonging to the KEK in the body."""
    code, body, headers, _, _ = answer_key(context, request.body)
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

"""The REST views of the master key management facility.

Each view takes the facility (``context``) and a ``webob.Request`` and returns
a response; ``keas.kmi.wsgi`` routes requests to them, and they can equally be
called directly, as the package documentation does.
"""
from webob import Response
from webob import exc

__all__ = ['get_status', 'create_key', 'get_key']

# Clients compare these bodies, so they are part of the API (FORMATS.md, 5).
KEY_NOT_FOUND = 'Key not found'
INVALID_KEK = 'Invalid key encrypting key'


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


def get_key(context, request):
    """``POST /key``: the data encrypting key belonging to the KEK in the body."""
    try:
        dek = context.getEncryptionKey(request.body)
    except KeyError:
        return _plain_error(exc.HTTPNotFound, KEY_NOT_FOUND)
    except ValueError:
        # A known name but a KEK that cannot be read: the client's mistake.
        return _plain_error(exc.HTTPBadRequest, INVALID_KEK)
    return _plain(dek)

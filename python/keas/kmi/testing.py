"""Test support: a facility with one constant key, a key holder for it, and
an in-process stand-in for the HTTP connection of the local facility."""
import io

import webob
from zope.interface import implementer

from keas.kmi import _kmi, facility, interfaces, rest

# The published testing key of keas.kmi: 512-bit RSA, e = 161, unencrypted
# PKCS#1 PEM. Existing test databases are encrypted under it.
KeyEncyptingKey = _kmi.TESTING_KEK

# Its DEK (32 bytes), wrapped with PKCS#1 v1.5 under the key above.
EncryptedEncryptionKey = (
    b'\xbc\x08\xdbo\x04\xe3\xc7G\x13\xd3\x86\x92\xfa\xe8i>,+\xda\xf8/B2]s\xd4'
    b'\x10}[\xfd\x19\x98\xb1\xfa*V~U\xdf\t\x02\x01\xa6\xa8\xae\x8b\x8cm\xd9n'
    b'\xd5\x83\xa1%k\x16lfuY\\q\x8c\x8b')


class FakeHTTPResponse(object):
    """The part of ``http.client.HTTPResponse`` the local facility reads."""

    def __init__(self, response):
        self.status = response.status_int
        self.reason = response.status.split(' ', 1)[-1]
        self.headers = dict(response.headerlist)
        self._body = io.BytesIO(response.body)

    def read(self, amt=None):
        return self._body.read(amt)

    def getheader(self, name, default=None):
        return self.headers.get(name, default)

    def close(self):
        pass


class FakeHTTPConnection(object):
    """Answers requests by calling the REST views on ``self.context``, a
    master facility, in process (``setupRestApi`` sets it)."""

    context = None

    def __init__(self, host, port=None, timeout=None, **kwargs):
        self.host = host
        self.port = port
        self.request_data = None

    def request(self, method, url, body=None, headers=None):
        self.request_data = (method, url, body or b'', headers or {})

    def getresponse(self):
        method, url, body, headers = self.request_data
        request = webob.Request.blank(url, method=method, body=body,
                                      headers=headers)
        views = {'/': rest.get_status, '/new': rest.create_key,
                 '/key': rest.get_key, '/rewrap': rest.rewrap_key}
        path = url.split('?', 1)[0]
        view = views.get(path)
        if view is None and path.startswith(rest.WRAPPED_PATH):
            view = rest.wrapped_key
        if view is None:
            return FakeHTTPResponse(webob.exc.HTTPNotFound())
        return FakeHTTPResponse(view(self.context, request))

    def close(self):
        pass


def setupRestApi(localFacility, masterFacility):
    """Route ``localFacility``'s HTTP and HTTPS requests to ``masterFacility``."""
    fake = type('FakeKMSConnection', (FakeHTTPConnection,),
                {'context': masterFacility})
    localFacility.httpConnFactory = fake
    localFacility.httpsConnFactory = fake


class TestingKeyManagementFacility(facility.KeyManagementFacility):
    """A facility whose ``generate`` always returns the testing key."""

    def __init__(self, storage_dir):
        super(TestingKeyManagementFacility, self).__init__(storage_dir)
        self[_kmi.kek_name(KeyEncyptingKey)] = EncryptedEncryptionKey

    def generate(self):
        return KeyEncyptingKey


@implementer(interfaces.IKeyHolder)
class TestingKeyHolder(object):
    """Holds the testing key."""
    key = KeyEncyptingKey

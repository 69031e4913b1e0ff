"""``testclient``: a command-line client for a key management server.

It shows the status page, asks for a new key encrypting key, fetches the data
key of a KEK, or encrypts and decrypts a file with it. Keys and data go to
standard output as raw bytes; every failure is one line on standard error and
a non-zero exit status.
"""
import argparse
import http.client
import os
import ssl
import sys
from urllib.parse import urlsplit

EXAMPLES = """\
examples:
  testclient https://localhost:8080                      status page
  testclient https://localhost:8080 -n > kek.dat         new key encrypting key
  testclient https://localhost:8080 -g kek.dat > dek.bin data key of a KEK
  testclient https://localhost:8080 -r kek.dat > new.dat new KEK for the same data key
  testclient https://localhost:8080 -e kek.dat data.txt > data.enc
  testclient https://localhost:8080 -d kek.dat data.enc > data.txt
  testclient https://localhost:8080 --wrapped -n > kek.dat   the KEK is made here,
  testclient https://localhost:8080 --wrapped -g kek.dat     and never sent
"""

# The self-signed certificate `make certs` copies next to the Makefile.
SAMPLE_CERTIFICATE = 'sample.crt'

# Exit statuses (argparse uses 2 for usage errors).
EXIT_FAILURE = 1
EXIT_NOT_FOUND = 3


class ClientError(Exception):
    """A failure to report in one line; ``status`` is the exit status."""

    def __init__(self, message, status=EXIT_FAILURE):
        super().__init__(message)
        self.status = status


def make_parser():
    parser = argparse.ArgumentParser(
        prog='testclient',
        description='Client for a keas.kmi key management server.',
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('url', help='the server, e.g. https://localhost:8080')
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        '-n', '--new', action='store_true',
        help='write a new key encrypting key (KEK) to standard output',
    )
    action.add_argument(
        '-g', '--get-key', metavar='KEK',
        help='write the data key of the KEK in this file to standard output',
    )
    action.add_argument(
        '-r', '--rewrap', metavar='KEK',
        help='write a new KEK for the data key of the KEK in this file to standard '
        'output; the server destroys the old entry (see --grace)',
    )
    action.add_argument(
        '-e', '--encrypt', nargs=2, metavar=('KEK', 'FILE'),
        help='encrypt FILE (- for standard input) with the data key of KEK',
    )
    action.add_argument(
        '-d', '--decrypt', nargs=2, metavar=('KEK', 'FILE'),
        help='decrypt FILE (- for standard input) with the data key of KEK',
    )
    parser.add_argument(
        '--wrapped', action='store_true',
        help='with -n, -g, -e, -d: keep the KEK here (keyMode wrapped): -n makes it '
        'locally and stores only its wrapped data key on the server, the others fetch '
        'the wrapped data key and unwrap it here (a keas.kmi 4 server)',
    )
    parser.add_argument(
        '--grace', type=float, metavar='SECONDS',
        help='with -r: keep the old KEK working (deactivated) this long, then destroy it',
    )
    tls = parser.add_argument_group('TLS')
    tls.add_argument(
        '--ca-certificate', metavar='FILE',
        help='trust the server certificates this CA file signs (default: the '
        'system store, and ./%s when there is one, as `make certs` leaves it)'
        % SAMPLE_CERTIFICATE,
    )
    tls.add_argument(
        '--cert', metavar='FILE',
        help='client certificate, for servers that require one '
        '(with its key unless --key is given)',
    )
    tls.add_argument('--key', metavar='FILE', help='private key of --cert')
    tls.add_argument(
        '--timeout', type=float, default=30.0, metavar='SECONDS',
        help='network timeout (default: %(default)s)',
    )
    return parser


def make_ssl_context(cafile=None, certfile=None, keyfile=None):
    """A verifying client context, with a client certificate if one is given.

    Without ``cafile`` it trusts the system store and, so that the self-signed
    development certificate works, ``./sample.crt`` if it exists.
    """
    try:
        context = ssl.create_default_context(cafile=cafile)
        if cafile is None and os.path.isfile(SAMPLE_CERTIFICATE):
            cafile = SAMPLE_CERTIFICATE
            context.load_verify_locations(cafile)
    except (OSError, ValueError) as error:
        raise ClientError('cannot load CA certificates from %s: %s'
                          % (cafile, describe(error)))
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ValueError) as error:
            raise ClientError('cannot load the client certificate %s: %s'
                              % (' and '.join(filter(None, (certfile, keyfile))),
                                 describe(error)))
    return context


class Client:
    """Talks to one server with ``http.client``."""

    def __init__(self, url, ssl_context=None, timeout=30.0):
        parts = urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ClientError('%s: not an http:// or https:// URL' % url)
        self.url = url
        self.scheme = parts.scheme
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip('/')
        self.ssl_context = ssl_context
        self.timeout = timeout

    def connection(self):
        if self.scheme == 'https':
            return http.client.HTTPSConnection(
                self.netloc, timeout=self.timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(self.netloc, timeout=self.timeout)

    def call(self, method, path, body=None):
        """The body of a 200 answer; anything else is a ClientError."""
        headers = {'Content-Type': 'text/plain'} if method == 'POST' else {}
        conn = self.connection()
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ssl.SSLError as error:
            raise ClientError('TLS failure talking to %s: %s' % (self.url, error))
        except (OSError, http.client.HTTPException) as error:
            raise ClientError('cannot reach %s: %s' % (self.url, describe(error)))
        finally:
            conn.close()
        if response.status != 200:
            text = data.decode('utf-8', 'replace').strip().splitlines()
            message = '%s %s answered %d %s%s' % (
                method, self.url.rstrip('/') + path, response.status,
                response.reason, ': ' + text[0] if text else '',
            )
            status = EXIT_NOT_FOUND if response.status == 404 else EXIT_FAILURE
            raise ClientError(message, status)
        return data


def describe(error):
    """An OSError as its reason (and file), without the errno prefix."""
    text = getattr(error, 'strerror', None) or str(error)
    filename = getattr(error, 'filename', None)
    return '%s: %s' % (filename, text) if filename else text


def read_file(path, what):
    if path == '-':
        return sys.stdin.buffer.read()
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise ClientError('cannot read %s %s: %s' % (what, path, describe(error)))


def local_facility(args, ssl_context, wrapped=False):
    from keas.kmi.facility import LocalKeyManagementFacility

    return LocalKeyManagementFacility(
        args.url, ssl_context=ssl_context,
        connect_timeout=args.timeout, read_timeout=args.timeout,
        keyMode='wrapped' if wrapped else 'legacy',
    )


def facility_call(args, call, kek_file=None, data_file=None):
    """``call()`` on a local facility, its failures as ClientErrors."""
    from keas.kmi.facility import KeyServiceError, WrappedKeysUnsupported

    try:
        return call()
    except KeyError:
        raise ClientError('%s does not know the key in %s' % (args.url, kek_file),
                          EXIT_NOT_FOUND)
    except ValueError as error:
        # The server refused the KEK, or the data is not encrypted with it.
        raise ClientError('%s: %s' % (data_file or kek_file, error))
    except WrappedKeysUnsupported as error:
        raise ClientError(str(error))
    except (OSError, http.client.HTTPException) as error:
        # The facility wraps network errors; report the one underneath.
        cause = error.__cause__ or error
        if isinstance(cause, ssl.SSLError):
            raise ClientError('TLS failure talking to %s: %s' % (args.url, cause))
        if isinstance(error, KeyServiceError) and error.__cause__ is None:
            raise ClientError(str(error))  # an answer, not a network failure
        raise ClientError('cannot reach %s: %s' % (args.url, describe(cause)))


def crypt(args, ssl_context, encrypting):
    """Encrypt or decrypt a file locally, with the data key from the server."""
    kek_file, data_file = args.encrypt if encrypting else args.decrypt
    kek = read_file(kek_file, 'key encrypting key')
    data = read_file(data_file, 'data')
    facility = local_facility(args, ssl_context, args.wrapped)
    if encrypting:
        return facility_call(args, lambda: facility.encrypt(kek, data), kek_file)
    return facility_call(args, lambda: facility.decrypt(kek, data), kek_file, data_file)


def run(args):
    """Do what the arguments ask; return the bytes for standard output."""
    ssl_context = None
    if args.url.startswith('https:'):
        ssl_context = make_ssl_context(args.ca_certificate, args.cert, args.key)
    if args.encrypt or args.decrypt:
        return crypt(args, ssl_context, encrypting=bool(args.encrypt))
    if args.wrapped:
        if args.new:
            facility = local_facility(args, ssl_context, wrapped=True)
            return facility_call(args, facility.generate)
        if args.get_key:
            kek = read_file(args.get_key, 'key encrypting key')
            facility = local_facility(args, ssl_context, wrapped=True)
            return facility_call(args, lambda: facility.getEncryptionKey(kek), args.get_key)
        raise ClientError('--wrapped goes with -n, -g, -e or -d')
    client = Client(args.url, ssl_context, args.timeout)
    if args.new:
        return client.call('POST', '/new', b'')
    if args.get_key:
        return client.call('POST', '/key', read_file(args.get_key, 'key encrypting key'))
    if args.rewrap:
        path = '/rewrap' if args.grace is None else '/rewrap?grace=%g' % args.grace
        return client.call('POST', path, read_file(args.rewrap, 'key encrypting key'))
    if args.grace is not None:
        raise ClientError('--grace goes with -r')
    status = client.call('GET', '/')
    return status.rstrip(b'\n') + b'\n'


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        output = run(args)
    except ClientError as error:
        print('testclient: %s' % error, file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return 130
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    return 0


if __name__ == '__main__':
    sys.exit(main())

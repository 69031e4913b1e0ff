"""An event-loop gunicorn worker: ``gunicorn -k keas.kmi.worker.EventWorker``
(or ``worker_class = keas.kmi.worker.EventWorker``).

One asyncio event loop per worker process accepts connections on gunicorn's
listening sockets (plain or TLS, exactly as gunicorn is configured, mutual TLS
included), reads and parses HTTP/1.x requests and writes the answers. The WSGI
application runs in a pool of ``threads`` threads, so that slow work (``POST
/new`` generates an RSA key) never holds up the loop. An application may answer
cheap requests on the loop itself: if it has a method ``inline_request(environ)``
that returns True for a request (asked once the body has been read, with
``wsgi.input`` an ``io.BytesIO``), the application is called directly on the
loop thread, without the hand-off to a thread and back.

Slow and idle clients hold no thread, only their socket and a few kilobytes:
a connection occupies a thread only while the application runs for it. An
idle kept-alive connection is closed after ``keepalive`` seconds; a request
that is not complete (request line, headers and body) ``timeout`` seconds
after its first byte is dropped, as is a TLS handshake not done by then and a
client that does not read its answer for that long. At most
``worker_connections`` connections are open per worker; more wait in the
listen backlog.

HTTP/1.0 and 1.1: keep-alive, pipelining, ``Content-Length`` and chunked
request bodies (at most ``EventWorker.max_body`` bytes, 64 KiB; larger is 413),
``Expect: 100-continue``, gunicorn's ``limit_request_line``,
``limit_request_fields`` and ``limit_request_field_size``; invalid requests
get a 4xx answer and the connection is closed. Answers are collected whole and
sent in one write, with a ``Content-Length``. Not supported: HTTP/2, the PROXY
protocol, ``sendfile``, streaming of large responses (they are buffered).
"""
import asyncio
import errno
import io
import logging
import os
import re
import signal
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.utils import formatdate

import gunicorn
from gunicorn import sock as gsock
from gunicorn import util
from gunicorn.config import PostRequest, PreRequest
from gunicorn.http.wsgi import FileWrapper, WSGIErrorsWrapper
from gunicorn.workers import base

try:  # gunicorn's check of forwarded_allow_ips (private; a fallback below)
    from gunicorn.http.message import _ip_in_allow_list
except ImportError:  # pragma: no cover
    _ip_in_allow_list = None

__all__ = ['EventWorker']

SERVER = getattr(gunicorn, 'SERVER', 'gunicorn')
SERVER_SOFTWARE = gunicorn.SERVER_SOFTWARE

# gunicorn's bounds for its limit_* settings (gunicorn.http.message).
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 32768
DEFAULT_MAX_HEADERFIELD_SIZE = 8190

LINGER_SECONDS = 2.0  # reading and dropping input after an error answer
LINGER_BYTES = 1024 * 1024
STOP_KEEPALIVE_LINGER = 2.0  # idle connections kept by a stopping worker
READ_AHEAD = 256 * 1024  # input buffered while a request is being answered
MAX_CHUNK_LINE = 1024

TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# In a request head: control characters but tab, and CR or LF outside CRLF.
BAD_HEAD_RE = re.compile(rb'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n')
VERSION_RE = re.compile(rb'HTTP/[0-9]\.[0-9]')
CHUNK_SIZE_RE = re.compile(rb'([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?')
STATUS_RE = re.compile(r'[1-9][0-9]{2}(?: [ \t\x21-\x7e\x80-\xff]*)?')
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEADER_VALUE_RE = re.compile(r'[ \t\x21-\x7e\x80-\xff]*')

# Response headers the server sets itself: hop-by-hop ones, Server and Date.
SERVER_HEADERS = frozenset(('connection', 'keep-alive', 'proxy-authenticate',
                            'proxy-authorization', 'te', 'trailers',
                            'transfer-encoding', 'upgrade', 'server', 'date'))
# RFC 9110 section 5.3: fields that must not be repeated.
SINGLETON_KEYS = frozenset(('HTTP_HOST', 'CONTENT_TYPE'))

REASONS = {
    400: 'Bad Request', 413: 'Content Too Large', 414: 'URI Too Long',
    417: 'Expectation Failed', 431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 501: 'Not Implemented',
    505: 'HTTP Version Not Supported',
}
INTERNAL_ERROR = (b'HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n'
                  b'Content-Length: 21\r\nConnection: close\r\n\r\nInternal Server Error')
CONTINUE = b'HTTP/1.1 100 Continue\r\n\r\n'
INFINITY = float('inf')


class HTTPError(Exception):
    """An invalid request: answered with ``status``, then the connection closes."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """The request as gunicorn's access log and request hooks read it
    (built only when one of them is configured)."""

    __slots__ = ('method', 'uri', 'path', 'query', 'fragment', 'version',
                 'headers', 'scheme', 'remote_addr', 'peer_addr', 'trailers')

    def __init__(self, method, uri, path, query, version, headers, scheme, peer):
        self.method = method
        self.uri = uri
        self.path = path
        self.query = query
        self.fragment = ''
        self.version = version
        self.headers = headers  # [(NAME, value)], names upper-case like gunicorn's
        self.scheme = scheme
        self.remote_addr = self.peer_addr = peer
        self.trailers = []


class Response:
    """An application's whole answer; also what gunicorn's access log reads
    (``status``, ``headers``, ``sent``)."""

    __slots__ = ('status', 'headers', 'written', 'body', 'sent')

    def __init__(self):
        self.status = None
        self.headers = None
        self.written = None
        self.body = b''
        self.sent = 0

    def start_response(self, status, headers, exc_info=None):
        # Nothing is sent before the application returns, so an error page
        # begun with exc_info may always replace an earlier start.
        if exc_info is None and self.status is not None:
            raise AssertionError('start_response called twice without exc_info')
        exc_info = None
        if not isinstance(status, str) or not STATUS_RE.fullmatch(status):
            raise ValueError('invalid HTTP status %r' % (status,))
        for name, value in headers:
            if not (isinstance(name, str) and HEADER_NAME_RE.fullmatch(name)):
                raise ValueError('invalid response header name %r' % (name,))
            if not (isinstance(value, str) and HEADER_VALUE_RE.fullmatch(value)):
                raise ValueError('invalid value for the response header %r' % (name,))
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data):
        if self.written is None:
            self.written = []
        self.written.append(bytes(data))


def run_app(app, environ, log):
    """Call a WSGI application; a Response holding its whole answer. Errors
    give a 500 with a plain body, their traceback goes to the error log."""
    resp = Response()
    try:
        result = app(environ, resp.start_response)
        try:
            if type(result) is list and len(result) == 1 and type(result[0]) is bytes:
                body = result[0]
            else:
                body = b''.join([chunk if type(chunk) is bytes else bytes(chunk)
                                 for chunk in result])
        finally:
            close = getattr(result, 'close', None)
            if close is not None:
                close()
        if resp.status is None:
            raise RuntimeError('the application did not call start_response')
        if resp.written:
            body = b''.join(resp.written) + body
        resp.body = body
    except Exception:
        log.exception('Error handling request %s %s',
                      environ.get('REQUEST_METHOD'), environ.get('RAW_URI'))
        resp = Response()
        resp.status = '500 Internal Server Error'
        resp.headers = [('Content-Type', 'text/plain')]
        resp.body = b'Internal Server Error'
    return resp


class Connection(asyncio.Protocol):
    """One client connection: reads requests, runs them, writes the answers,
    one request at a time and in order."""

    def __init__(self, worker, server_name, server_port):
        self.worker = worker
        self.server_name = server_name
        self.server_port = server_port
        self.transport = None
        self.tls = False
        self.peer = None
        self.base_env = None
        self.trusted = None  # may the peer set the scheme headers
        self.buf = b''
        self.scan = 0  # where to look on for the end of the head
        self.head = None  # (environ, request, keep_alive) whose body is awaited
        self.need = 0  # Content-Length of the awaited body
        self.chunks = None  # a chunked body so far
        self.chunked_size = 0
        self.chunk_left = -1  # bytes left in this chunk; -1 size line, -2 CRLF, -3 trailer
        self.trailer_lines = 0
        self.expect = False  # a 100 Continue is due when the body is awaited
        self.busy = False  # the application runs in a thread for this connection
        self.paused = False  # the client does not read: the transport is full
        self.reading = True
        self.closing = False
        self.draining = -1  # bytes dropped after an error answer; -1: not draining
        self.eof = False
        self.deadline = INFINITY

    # asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport):
        worker = self.worker
        self.transport = transport
        self.tls = transport.get_extra_info('sslcontext') is not None
        peer = self.peer = transport.get_extra_info('peername')
        env = worker.base_env.copy()
        if isinstance(peer, tuple):
            env['REMOTE_ADDR'] = peer[0]
            env['REMOTE_PORT'] = str(peer[1])
        elif isinstance(peer, bytes):
            env['REMOTE_ADDR'] = peer.decode('latin-1')
        else:
            env['REMOTE_ADDR'] = peer or ''
        if self.server_name is not None:
            env['SERVER_NAME'] = self.server_name
            env['SERVER_PORT'] = self.server_port
        self.base_env = env
        self.deadline = time.monotonic() + worker.request_timeout
        worker.connection_opened(self)

    def connection_lost(self, exc):
        self.transport = None
        self.buf = b''
        self.worker.connection_closed(self)

    def pause_writing(self):
        self.paused = True
        self.deadline = time.monotonic() + self.worker.request_timeout

    def resume_writing(self):
        self.paused = False
        if not self.busy and self.transport is not None and not self.closing:
            self.deadline = time.monotonic() + self.worker.request_timeout
            self.process()

    def eof_received(self):
        self.eof = True
        # A client that half-closes after its request still gets the answer
        # (TCP only: a TLS transport closes on EOF whatever we say).
        return self.busy and self.draining < 0 and not self.tls

    def data_received(self, data):
        if self.draining >= 0:
            self.draining += len(data)
            if self.draining > LINGER_BYTES:
                self.transport.close()
            return
        if self.closing:
            return
        buf = self.buf
        if buf:
            if type(buf) is bytes:
                buf = self.buf = bytearray(buf)
            buf += data
        else:
            self.buf = data
            if self.head is None and not self.busy:
                # The first byte of a request: it has request_timeout to arrive.
                self.deadline = time.monotonic() + self.worker.request_timeout
        if self.busy or self.paused:
            if self.reading and len(self.buf) > READ_AHEAD:
                self.reading = False
                self.transport.pause_reading()
            return
        self.process()

    # Deadlines and stopping --------------------------------------------------------

    def expire(self):
        """The worker's clock found ``deadline`` passed."""
        transport = self.transport
        if transport is None or self.busy:
            return
        if self.closing or self.paused:
            # Draining after an error, or an answer the client does not take.
            transport.abort()
            return
        if self.buf or self.head is not None:
            self.worker.log.debug('Closing the connection of %s: request not complete '
                                  'within %ss', self.peer, self.worker.request_timeout)
        self.closing = True
        transport.close()

    def stop(self, deadline):
        """The worker is stopping: an idle connection goes by ``deadline``."""
        if not self.busy and not self.buf and self.head is None:
            self.deadline = min(self.deadline, deadline)

    # Requests ----------------------------------------------------------------------

    def process(self):
        """Answer the complete requests in buf, in order, until one goes to
        a thread, the client stops reading, or more input is needed."""
        try:
            while not self.busy and not self.paused and not self.closing:
                if self.head is None and not self.read_head():
                    break
                if self.chunks is not None:
                    body = self.read_chunked()
                    if body is None:
                        break
                elif self.need:
                    need = self.need
                    buf = self.buf
                    size = len(buf)
                    if size < need:
                        self.expect_continue()
                        break
                    if size == need:
                        body = buf if type(buf) is bytes else bytes(buf)
                        self.buf = b''
                    else:
                        body = bytes(buf[:need])
                        self.buf = buf[need:]
                else:
                    body = b''
                environ, req, keep_alive = self.head
                self.head = None
                self.dispatch(environ, req, keep_alive, body)
            else:
                return
            # Waiting for input: a new request, or the rest of one.
            if self.eof:  # which will not come
                self.closing = True
                self.transport.close()
                return
            if not self.buf and self.head is None:
                self.deadline = time.monotonic() + self.worker.keepalive_timeout
            elif self.deadline == INFINITY:  # the rest of a pipelined request
                self.deadline = time.monotonic() + self.worker.request_timeout
            if not self.reading and len(self.buf) <= READ_AHEAD:
                self.reading = True
                self.transport.resume_reading()
        except HTTPError as error:
            self.refuse(error.status, error.message)
        except Exception:
            self.worker.log.exception('Error reading a request from %s', self.peer)
            self.refuse(500, 'Internal Server Error')

    def expect_continue(self):
        """The client waits for a go-ahead before it sends the body."""
        if self.expect:
            self.expect = False
            self.transport.write(CONTINUE)

    def read_head(self):
        """Parse the request line and headers once they are all in buf."""
        buf = self.buf
        while buf[:2] == b'\r\n':  # RFC 9112 2.2: empty lines before a request
            buf = self.buf = buf[2:]
            self.scan = 0
        if not buf:
            return False
        end = buf.find(b'\r\n\r\n', self.scan)
        if end < 0:
            worker = self.worker
            size = len(buf)
            self.scan = size - 3 if size > 3 else 0
            if size > worker.max_line + 2 and buf.find(b'\r\n', 0, worker.max_line + 2) < 0:
                raise HTTPError(414, 'Request line too long')
            if size > worker.max_head:
                raise HTTPError(431, 'Request header fields too large')
            return False
        self.scan = 0
        head = buf[:end]
        rest = buf[end + 4:]
        self.buf = rest if type(rest) is bytes or len(rest) > READ_AHEAD else bytes(rest)
        self.head = self.parse_head(head if type(head) is bytes else bytes(head))
        return True

    def parse_head(self, head):
        worker = self.worker
        if BAD_HEAD_RE.search(head) is not None:
            raise HTTPError(400, 'Invalid character in the request head')
        lines = head.split(b'\r\n')
        line = lines[0]
        if len(line) > worker.max_line:
            raise HTTPError(414, 'Request line too long')
        parts = line.split(b' ')
        if len(parts) != 3:
            raise HTTPError(400, 'Invalid request line')
        method, target, version = parts
        if not TOKEN_RE.fullmatch(method):
            raise HTTPError(400, 'Invalid method')
        if version == b'HTTP/1.1':
            minor = 1
        elif version == b'HTTP/1.0':
            minor = 0
        elif VERSION_RE.fullmatch(version):
            raise HTTPError(505, 'HTTP version not supported')
        else:
            raise HTTPError(400, 'Invalid HTTP version')
        if len(lines) - 1 > worker.max_fields:
            raise HTTPError(431, 'Too many header fields')

        environ = self.base_env.copy()
        field_size = worker.max_field_size
        raw_headers = [] if worker.want_request else None
        scheme_names = worker.scheme_header_names
        scheme_headers = None
        underscores = worker.underscores
        keep_alive = minor == 1
        chunked = False
        length = None
        expect = False
        for line in lines[1:]:
            if len(line) > field_size:
                raise HTTPError(431, 'Header field too large')
            name, colon, value = line.partition(b':')
            if not colon or not TOKEN_RE.fullmatch(name):
                if line[:1] in (b' ', b'\t'):
                    raise HTTPError(400, 'Obsolete line folding')
                raise HTTPError(400, 'Invalid header field')
            name = name.decode('ascii').upper()
            value = value.strip(b' \t').decode('latin-1')
            if raw_headers is not None:
                raw_headers.append((name, value))
            if scheme_names and name in scheme_names:
                if scheme_headers is None:
                    scheme_headers = []
                scheme_headers.append((name, value))
            if '_' in name and underscores != 'dangerous':
                if underscores == 'refuse':
                    raise HTTPError(400, 'Invalid header name %s' % name)
                continue  # dropped: HTTP_X_A would mix X-A and X_A
            if name == 'CONTENT-LENGTH':
                if length is not None or not (value.isascii() and value.isdigit()):
                    raise HTTPError(400, 'Invalid Content-Length')
                length = int(value)
                environ['CONTENT_LENGTH'] = value
                continue
            if name == 'CONTENT-TYPE':
                key = 'CONTENT_TYPE'
            else:
                key = 'HTTP_' + name.replace('-', '_')
                if name == 'TRANSFER-ENCODING':
                    if minor == 0:
                        raise HTTPError(400, 'Transfer-Encoding in an HTTP/1.0 request')
                    codings = [c.strip() for c in value.lower().split(',')]
                    if chunked or codings[-1] != 'chunked':
                        raise HTTPError(400, 'Invalid Transfer-Encoding')
                    if len(codings) > 1:
                        raise HTTPError(501, 'Unsupported transfer coding')
                    chunked = True
                elif name == 'CONNECTION':
                    tokens = [t.strip() for t in value.lower().split(',')]
                    if 'close' in tokens:
                        keep_alive = False
                    elif 'keep-alive' in tokens and minor == 0:
                        keep_alive = True
                elif name == 'EXPECT':
                    if value.lower() != '100-continue':
                        raise HTTPError(417, 'Unsupported expectation')
                    expect = minor == 1  # RFC 9110 10.1.1: ignored in HTTP/1.0
            if key in environ:
                if key in SINGLETON_KEYS:
                    raise HTTPError(400, 'Repeated %s header' % name)
                environ[key] += ',' + value
            else:
                environ[key] = value

        if chunked:
            if length is not None:
                raise HTTPError(400, 'Both Content-Length and Transfer-Encoding')
            self.chunks = []
            self.chunked_size = 0
            self.chunk_left = -1
            self.trailer_lines = 0
            self.need = 0
        else:
            if length is not None and length > worker.max_body:
                raise HTTPError(413, 'Request body too large')
            self.need = length or 0
            expect = expect and self.need > 0  # no body: nothing to continue
        self.expect = expect

        target = target.decode('latin-1')
        if target[:1] == '/':
            path, _, query = target.partition('?')
        elif target.startswith(('http://', 'https://')):  # absolute-form
            slash = target.find('/', target.index('//') + 2)
            path, _, query = (target[slash:] if slash >= 0 else '/').partition('?')
        elif target == '*' and method == b'OPTIONS':
            path, query = '*', ''
        else:
            raise HTTPError(400, 'Invalid request target')
        if '#' in query:
            query = query.partition('#')[0]
        elif '#' in path:
            path = path.partition('#')[0]
        script_name = worker.script_name
        if script_name:
            if not path.startswith(script_name):
                raise HTTPError(400, 'Request path outside SCRIPT_NAME %s' % script_name)
            path_info = path[len(script_name):]
        else:
            path_info = path
        if '%' in path_info:
            path_info = util.unquote_to_wsgi_str(path_info)
        method = method.decode('ascii')
        environ['REQUEST_METHOD'] = method
        environ['RAW_URI'] = target
        environ['PATH_INFO'] = path_info
        environ['QUERY_STRING'] = query
        environ['SERVER_PROTOCOL'] = 'HTTP/1.1' if minor else 'HTTP/1.0'
        if scheme_headers is not None:
            self.apply_scheme_headers(environ, scheme_headers)
        if self.server_name is None:  # a UNIX socket: the Host header, if any
            host = environ.get('HTTP_HOST', '')
            name, _, port = host.rpartition(':') if host.count(':') == 1 else (host, '', '')
            environ['SERVER_NAME'] = name
            environ['SERVER_PORT'] = port or (
                ('443' if environ['wsgi.url_scheme'] == 'https' else '80') if host else '')
        req = None
        if raw_headers is not None:
            req = Request(method, target, path, query, (1, minor), raw_headers,
                          environ['wsgi.url_scheme'], self.peer)
        return environ, req, keep_alive

    def apply_scheme_headers(self, environ, headers):
        """gunicorn's secure_scheme_headers, from forwarded_allow_ips peers."""
        if self.trusted is None:
            self.trusted = self.worker.peer_is_trusted(self.peer)
        if not self.trusted:
            return
        secure = self.worker.cfg.secure_scheme_headers
        schemes = {'https' if value == secure[name] else 'http' for name, value in headers}
        if len(schemes) > 1:
            raise HTTPError(400, 'Contradictory scheme headers')
        environ['wsgi.url_scheme'] = schemes.pop()

    def read_chunked(self):
        """Decode what buf holds of a chunked body; the body once complete."""
        buf = self.buf
        pos = 0
        size = len(buf)
        chunks = self.chunks
        while True:
            left = self.chunk_left
            if left > 0:  # chunk data
                take = min(left, size - pos)
                if not take:
                    break
                chunks.append(bytes(buf[pos:pos + take]))
                pos += take
                left -= take
                self.chunk_left = left if left else -2
                continue
            if left == -2:  # the CRLF after the data
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b'\r\n':
                    raise HTTPError(400, 'Missing chunk terminator')
                pos += 2
                self.chunk_left = -1
                continue
            end = buf.find(b'\r\n', pos, pos + MAX_CHUNK_LINE + 2)
            if end < 0:
                if size - pos > MAX_CHUNK_LINE:
                    raise HTTPError(400, 'Chunk size or trailer line too long')
                break
            line = bytes(buf[pos:end])
            pos = end + 2
            if left == -3:  # the trailer section, dropped
                if line:
                    self.trailer_lines += 1
                    if self.trailer_lines > self.worker.max_fields:
                        raise HTTPError(431, 'Too many trailer fields')
                    continue
                self.buf = buf[pos:]
                self.chunks = None
                body = b''.join(chunks)
                # Decoded whole: its length is known, for applications that
                # read CONTENT_LENGTH and ignore wsgi.input_terminated.
                self.head[0]['CONTENT_LENGTH'] = str(len(body))
                return body
            match = CHUNK_SIZE_RE.fullmatch(line)
            if match is None:
                raise HTTPError(400, 'Invalid chunk size')
            chunk = int(match.group(1), 16)
            self.chunked_size += chunk
            if self.chunked_size > self.worker.max_body:
                raise HTTPError(413, 'Request body too large')
            self.chunk_left = chunk if chunk else -3
        self.buf = buf[pos:]
        self.expect_continue()
        return None

    def dispatch(self, environ, req, keep_alive, body):
        """Run the application for a complete request: inline or in a thread."""
        worker = self.worker
        environ['wsgi.input'] = io.BytesIO(body)
        worker.nr += 1
        if worker.nr >= worker.max_requests and worker.alive:
            worker.log.info('Autorestarting worker after current request.')
            worker.alive = False
            worker.loop.call_soon(worker.begin_shutdown)
        start = time.time() if req is not None else 0.0
        if req is not None and worker.hooks:
            try:
                worker.cfg.pre_request(worker, req)
            except Exception:
                worker.log.exception('Exception in pre_request hook')
        inline = worker.inline_request
        if inline is not None:
            try:
                inline = inline(environ)
            except Exception:
                worker.log.exception('Error in the inline_request of the application')
                inline = False
            if inline:
                self.finish(environ, req, keep_alive, start,
                            run_app(worker.wsgi, environ, worker.log))
                return
        self.busy = True
        self.deadline = INFINITY
        worker.pool.submit(self.run_in_thread, environ, req, keep_alive, start)

    def run_in_thread(self, environ, req, keep_alive, start):
        worker = self.worker
        resp = run_app(worker.wsgi, environ, worker.log)
        try:
            worker.loop.call_soon_threadsafe(
                self.finish_from_thread, environ, req, keep_alive, start, resp)
        except RuntimeError:  # the loop is closed: the worker is exiting
            pass

    def finish_from_thread(self, environ, req, keep_alive, start, resp):
        self.busy = False
        try:
            self.finish(environ, req, keep_alive, start, resp)
        except Exception:
            self.worker.log.exception('Error sending an answer to %s', self.peer)
            if self.transport is not None:
                self.transport.abort()
            return
        if self.transport is not None and not self.closing:
            self.process()

    # Answers -----------------------------------------------------------------------

    def finish(self, environ, req, keep_alive, start, resp):
        """Write an application's answer: status line, headers and body at once."""
        worker = self.worker
        transport = self.transport
        status = resp.status
        code = int(status[:3])
        method = environ['REQUEST_METHOD']
        body = resp.body
        lines = ['HTTP/1.1 ', status, '\r\n']
        length = None
        for name, value in resp.headers:
            lower = name.lower()
            if lower in SERVER_HEADERS:
                if lower == 'connection' and 'close' in value.lower():
                    keep_alive = False
                continue
            if lower == 'content-length':
                if length is not None:
                    continue
                length = value
            lines += (name, ': ', value, '\r\n')
        if code < 200 or code == 204 or code == 304:
            body = b''
        elif length is not None:
            declared = int(length) if length.isascii() and length.isdigit() else -1
            if declared != len(body) and method != 'HEAD':
                if 0 <= declared < len(body):
                    body = body[:declared]
                else:
                    worker.log.error('%s %s: Content-Length %r for a body of %d bytes; '
                                     'closing the connection after it', method,
                                     environ['RAW_URI'], length, len(body))
                    keep_alive = False
        elif method != 'HEAD' or body:
            lines += ('Content-Length: ', str(len(body)), '\r\n')
        if method == 'HEAD':
            body = b''
        if keep_alive and (not worker.alive or self.eof or transport is None
                           or not worker.keepalive_timeout):
            keep_alive = False
        if not keep_alive:
            lines.append('Connection: close\r\n')
        elif environ['SERVER_PROTOCOL'] == 'HTTP/1.0':
            lines.append('Connection: keep-alive\r\n')
        lines.append(worker.head_end())
        try:
            data = ''.join(lines).encode('latin-1')
        except UnicodeEncodeError:
            worker.log.error('%s %s: a response header is not Latin-1',
                             method, environ['RAW_URI'])
            data, body, keep_alive = INTERNAL_ERROR, b'', False
        resp.sent = len(body)
        if transport is not None:
            transport.write(data + body if body else data)
            if not keep_alive:
                self.closing = True
                self.buf = b''
                # Flushed then closed; aborted if not taken by the deadline.
                self.deadline = time.monotonic() + worker.request_timeout
                transport.close()
        if req is not None:
            if worker.access_log:
                try:
                    worker.log.access(resp, req, environ,
                                      timedelta(seconds=time.time() - start))
                except Exception:
                    worker.log.exception('Error writing the access log')
            if worker.hooks:
                try:
                    worker.cfg.post_request(worker, req, environ, resp)
                except Exception:
                    worker.log.exception('Exception in post_request hook')

    def refuse(self, status, message):
        """Answer an invalid request with ``status`` and close the connection."""
        worker = self.worker
        self.head = None
        self.chunks = None
        self.buf = b''
        if status < 500:
            peer = self.peer[0] if isinstance(self.peer, tuple) else self.peer
            worker.log.warning('Invalid request from ip=%s: %s', peer, message)
        transport = self.transport
        if transport is None or self.closing:
            return
        body = (message + '\n').encode('latin-1', 'replace')
        transport.write(('HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\n'
                         'Content-Length: %d\r\nConnection: close\r\n'
                         % (status, REASONS.get(status, 'Error'), len(body))
                         ).encode('latin-1') + worker.head_end().encode('latin-1') + body)
        self.linger()

    def linger(self):
        """Close after an answer to a client that may still be sending: read
        and drop its input for a while, so that it reads the answer instead
        of a connection reset."""
        transport = self.transport
        self.closing = True
        self.draining = 0
        self.deadline = time.monotonic() + LINGER_SECONDS
        if self.paused:
            return  # the answer is not even out: expire() aborts at the deadline
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        if self.eof:
            transport.close()
        elif transport.can_write_eof():
            transport.write_eof()


class EventWorker(base.Worker):
    """A gunicorn worker serving HTTP/1.x from one asyncio event loop, the
    WSGI application in a pool of ``threads`` threads, or on the loop for
    the requests its ``inline_request(environ)`` accepts."""

    #: The largest request body accepted; a larger one is answered with 413.
    max_body = 64 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.loop = None
        self.pool = None
        self.conns = set()
        self.pending = set()  # connections still in their TLS handshake
        self.listeners = []
        self.accepting = False
        self.stopping = False
        self.stop_deadline = INFINITY
        self.ssl_context = None
        self.inline_request = None
        self.access_log = False
        self.hooks = False
        self.want_request = False
        self.base_env = {}
        self._head_end = (0, '')

        line = cfg.limit_request_line
        if line < 0 or line >= MAX_REQUEST_LINE:
            line = MAX_REQUEST_LINE
        elif line == 0:
            line = 1024 * 1024
        self.max_line = line
        fields = cfg.limit_request_fields
        if fields <= 0 or fields > MAX_HEADERS:
            fields = MAX_HEADERS
        self.max_fields = fields
        field_size = cfg.limit_request_field_size
        if field_size <= 0:
            field_size = DEFAULT_MAX_HEADERFIELD_SIZE
        self.max_field_size = field_size
        self.max_head = line + 2 + fields * (field_size + 2) + 2
        # How long a started request, a TLS handshake, or an answer the
        # client does not read may take.
        self.request_timeout = float(cfg.timeout) if cfg.timeout > 0 else 30.0
        self.keepalive_timeout = float(cfg.keepalive)
        self.underscores = getattr(cfg, 'header_map', 'drop')
        self.scheme_header_names = frozenset(cfg.secure_scheme_headers or ())
        self.script_name = os.environ.get('SCRIPT_NAME', '')

    # Process setup -------------------------------------------------------------------

    def init_process(self):
        # After the fork: this process's own loop and threads.
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.threads,
                                       thread_name_prefix='wsgi')
        super().init_process()

    def load_wsgi(self):
        cfg = self.cfg
        if getattr(cfg, 'proxy_protocol', 'off') not in ('off', False, None) \
                or getattr(cfg, 'protocol', 'http') != 'http':
            raise RuntimeError('keas.kmi.worker.EventWorker speaks plain HTTP/1.x: '
                               'no proxy_protocol, no uwsgi protocol')
        if 'h2' in (getattr(cfg, 'http_protocols', None) or ()):
            self.log.warning('keas.kmi.worker.EventWorker serves HTTP/1.x only, '
                             'not HTTP/2 (http_protocols)')
        super().load_wsgi()
        inline = getattr(self.wsgi, 'inline_request', None)
        self.inline_request = inline if callable(inline) else None
        log = self.log
        access = getattr(log, 'access_log_enabled', True)
        logger = getattr(log, 'access_log', None)
        if (access and type(log).__module__ == 'gunicorn.glogging'
                and isinstance(logger, logging.Logger)
                and not (logger.hasHandlers() and logger.isEnabledFor(logging.INFO))):
            access = False  # gunicorn's own logger, with nowhere to write to
        self.access_log = bool(access)
        self.hooks = (cfg.pre_request is not PreRequest.default
                      or cfg.post_request is not PostRequest.default)
        self.want_request = self.access_log or self.hooks
        self.base_env = {
            'wsgi.version': (1, 0),
            'wsgi.errors': WSGIErrorsWrapper(cfg),
            'wsgi.multithread': True,
            'wsgi.multiprocess': cfg.workers > 1,
            'wsgi.run_once': False,
            'wsgi.file_wrapper': FileWrapper,
            'wsgi.input_terminated': True,
            'wsgi.url_scheme': 'https' if cfg.is_ssl else 'http',
            'SERVER_SOFTWARE': SERVER_SOFTWARE,
            'SCRIPT_NAME': self.script_name,
        }

    def head_end(self):
        """The end of every response head: Server, Date and the empty line."""
        now = int(time.time())
        if self._head_end[0] != now:
            self._head_end = (now, 'Server: %s\r\nDate: %s\r\n\r\n'
                              % (SERVER, formatdate(now, usegmt=True)))
        return self._head_end[1]

    def peer_is_trusted(self, peer):
        """Whether the peer is in forwarded_allow_ips (gunicorn's rule)."""
        cfg = self.cfg
        if not isinstance(peer, tuple):
            return True
        allow = cfg.forwarded_allow_ips
        if '*' in allow:
            return True
        networks = getattr(cfg, 'forwarded_allow_networks', None)
        if _ip_in_allow_list is not None and networks is not None:
            return _ip_in_allow_list(peer[0], allow, networks())
        return peer[0] in allow

    # The loop --------------------------------------------------------------------------

    def run(self):
        loop = self.loop
        loop.set_exception_handler(self.loop_exception)
        for sig, handler in ((signal.SIGTERM, self.handle_term),
                             (signal.SIGINT, self.handle_quit_signal),
                             (signal.SIGQUIT, self.handle_quit_signal),
                             (signal.SIGUSR1, self.log.reopen_files),
                             (signal.SIGABRT, self.handle_abort_signal),
                             (signal.SIGWINCH, self.handle_winch_signal)):
            loop.add_signal_handler(sig, handler)
        if self.cfg.is_ssl:
            context = gsock.ssl_context(self.cfg)
            alpn = getattr(gsock, '_get_alpn_protocols', None)
            if alpn is not None and alpn(self.cfg):
                context.set_alpn_protocols(['http/1.1'])  # no HTTP/2 here
            self.ssl_context = context
        for listener in self.sockets:
            raw = getattr(listener, 'sock', listener)
            raw.setblocking(False)
            name = raw.getsockname()
            info = (str(name[0]), str(name[1])) if isinstance(name, tuple) else (None, None)
            self.listeners.append((raw, info))
        self.set_accepting(True)
        loop.call_soon(self.tick)
        try:
            if self.alive:
                loop.run_forever()
        finally:
            self.close_all()

    def close_all(self):
        self.set_accepting(False)
        for task in list(self.pending):
            task.cancel()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        self.pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.loop.run_until_complete(asyncio.sleep(0))
        except Exception:
            pass
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                pass
        self.loop.close()

    def set_accepting(self, enabled):
        if enabled == self.accepting:
            return
        self.accepting = enabled
        for raw, info in self.listeners:
            if enabled:
                self.loop.add_reader(raw.fileno(), self.accept, raw, info)
            else:
                self.loop.remove_reader(raw.fileno())

    def accept(self, listener, info):
        for _ in range(64):
            if len(self.conns) + len(self.pending) >= self.cfg.worker_connections:
                self.set_accepting(False)  # check_capacity resumes it
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno == errno.ECONNABORTED:
                    continue
                self.log.error('Cannot accept connections: %s', error)
                self.set_accepting(False)  # EMFILE and the like: retry soon
                self.loop.call_later(0.5, self.check_capacity)
                return
            task = self.loop.create_task(self.connect(sock, info))
            self.pending.add(task)
            task.add_done_callback(self.connected)

    async def connect(self, sock, info):
        name, port = info
        try:
            await self.loop.connect_accepted_socket(
                lambda: Connection(self, name, port), sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.request_timeout if self.ssl_context else None)
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            self.log.debug('Connection closed before its first request: %r', error)
            sock.close()
        except Exception:
            self.log.exception('Error setting up a connection')
            sock.close()

    def connected(self, task):
        self.pending.discard(task)
        if self.stopping:
            self.check_stopped()
        else:
            self.check_capacity()

    def connection_opened(self, conn):
        self.conns.add(conn)
        if self.stopping:
            conn.stop(time.monotonic() + STOP_KEEPALIVE_LINGER)

    def connection_closed(self, conn):
        self.conns.discard(conn)
        if self.stopping:
            self.check_stopped()
        else:
            self.check_capacity()

    def check_capacity(self):
        if (not self.accepting and self.alive and not self.stopping
                and len(self.conns) + len(self.pending) < self.cfg.worker_connections):
            self.set_accepting(True)

    def check_stopped(self):
        if not self.conns and not self.pending:
            self.loop.stop()

    def tick(self):
        """Every second: heartbeat, deadlines, the parent and shutdown."""
        self.loop.call_later(1.0, self.tick)
        self.notify()
        now = time.monotonic()
        for conn in [conn for conn in self.conns if conn.deadline < now]:
            try:
                conn.expire()
            except Exception:
                self.log.exception('Error closing a connection')
        if self.alive and self.ppid != os.getppid():
            self.log.info('Parent changed, shutting down: %s', self)
            self.alive = False
        if not self.alive and not self.stopping:
            self.begin_shutdown()  # e.g. the reloader cleared alive
        if self.stopping and now > self.stop_deadline:
            self.loop.stop()

    # Signals and shutdown --------------------------------------------------------------

    def begin_shutdown(self):
        """Stop accepting; finish the requests in flight within
        graceful_timeout, then leave."""
        if self.stopping:
            return
        self.alive = False
        self.stopping = True
        now = time.monotonic()
        self.stop_deadline = now + self.cfg.graceful_timeout
        self.set_accepting(False)
        for task in list(self.pending):
            task.cancel()
        for conn in list(self.conns):
            conn.stop(now + STOP_KEEPALIVE_LINGER)
        self.check_stopped()

    def handle_term(self):
        self.begin_shutdown()

    def handle_quit_signal(self):
        self.alive = False
        self.cfg.worker_int(self)
        self.loop.stop()

    def handle_abort_signal(self):
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def handle_winch_signal(self):
        self.log.debug('worker: SIGWINCH ignored.')

    def loop_exception(self, loop, context):
        error = context.get('exception')
        if isinstance(error, (ConnectionError, ssl.SSLError, asyncio.TimeoutError)):
            self.log.debug('%s: %r', context.get('message'), error)
        else:
            self.log.error('%s: %r', context.get('message'), error,
                           exc_info=error if isinstance(error, BaseException) else None)

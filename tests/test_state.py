"""The Rust fast path for EncryptedPersistent state pickles (_kmi.dump_state,
_kmi.load_state) against zodbpickle, which wrote every existing state.

dump_state must give zodbpickle's bytes or None (then zodbpickle pickles);
load_state must give zodbpickle's object or the default (then zodbpickle
reads). A fast answer that differs is a failure.
"""
import io
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zodbpickle.pickle import Pickler, Unpickler

from keas.kmi import _kmi
from keas.kmi.persistent import pickle_nonpersistent, unpickle_nonpersistent

UNREAD = object()


def zodbpickle_dump(state):
    buf = io.BytesIO()
    Pickler(buf, 2).dump(state)
    return buf.getvalue()


def zodbpickle_load(data):
    return Unpickler(io.BytesIO(data)).load()


def same_object(a, b):
    """Equal structure, NaNs and sharing included: the same zodbpickle bytes."""
    return zodbpickle_dump(a) == zodbpickle_dump(b)


def check_round_trip(state, fast_load=True):
    expected = zodbpickle_dump(state)
    data = _kmi.dump_state(state)
    assert data == expected
    loaded = _kmi.load_state(expected, UNREAD)
    if fast_load:
        assert loaded is not UNREAD
    if loaded is not UNREAD:
        assert same_object(loaded, zodbpickle_load(expected))
    # The public helpers agree whichever path they take.
    data, refs = pickle_nonpersistent(state)
    assert data == expected and refs == []
    assert same_object(unpickle_nonpersistent(data, refs), zodbpickle_load(data))


atoms = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.sampled_from([0, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -2**31,
                     2**31, -2**31 - 1, 2**32, 2**63 - 1, -2**63, -2**55, 2**55]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=40),
    st.binary(max_size=40),
)
states = st.recursive(
    atoms,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2**63, 2**63 - 1),
                                  st.binary(max_size=4)),
                        children, max_size=6),
    ),
    max_leaves=30,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states)
def test_plain_states_pickle_to_zodbpickles_bytes_and_back(state):
    check_round_trip(state)


@pytest.mark.parametrize('size', [0, 1, 2, 255, 256, 257, 999, 1000, 1001, 2000, 2001, 2500])
def test_batches_and_long_memo_indexes(size):
    check_round_trip({'list': ['s%d' % i for i in range(size)],
                      'dict': {'k%d' % i: i for i in range(size)},
                      'tuple': tuple(range(size))})


def test_shared_and_recursive_objects():
    shared = ['shared']
    check_round_trip({'a': shared, 'b': shared, 'c': (shared, shared)})
    loop = []
    loop.append(loop)
    check_round_trip(loop)
    inner = []
    outer = (inner, 1)
    inner.append(outer)
    # A recursive tuple pickles with POP/POP_MARK, which the fast reader
    # leaves to zodbpickle.
    check_round_trip(outer, fast_load=False)
    inner4 = []
    outer4 = (inner4, 1, 2, 3, 4)
    inner4.append(outer4)
    check_round_trip({'x': outer4}, fast_load=False)


def test_bytes_reduce_memo_matches_the_c_pickler():
    # The one-character str of a 1-byte bytes is CPython's shared str, and the
    # "latin1" argument is interned: both may already be in the memo.
    check_round_trip({'x': b'x', 'y': 'x', 'latin1': 'latin1', 'z': [b'x', b'x'[:1]]})
    check_round_trip([b'', b'', b'\xff', b'\xff\x00', bytes(range(256)), 'latin1'])
    check_round_trip(('a', b'a', b'a' + b'', 'é', b'\xe9'))


class Text(str):
    pass


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize('state', [
    2**63, -2**63 - 1, 10**40,                 # beyond 64 bits
    'lone \udc80 surrogate',                   # zodbpickle writes surrogatepass
    {1, 2}, frozenset([1]), 1j, bytearray(b'x'),
    Text('subclass'),
    nested(300),                               # deeper than the Rust walk goes
])
def test_other_values_are_left_to_zodbpickle(state):
    state = {'value': state}
    assert _kmi.dump_state(state) is None
    assert unpickle_nonpersistent(*pickle_nonpersistent(state)) == state
    # The fast reader reads what zodbpickle wrote, or declines.
    data = zodbpickle_dump(state)
    loaded = _kmi.load_state(data, UNREAD)
    if loaded is not UNREAD:
        assert same_object(loaded, zodbpickle_load(data))


def test_python2_era_pickles_are_left_to_zodbpickle():
    # SHORT_BINSTRING / BINSTRING, as Python 2's cPickle wrote str.
    old = b'\x80\x02}q\x00U\x04nameq\x01U\x03bobq\x02s.'
    assert _kmi.load_state(old, UNREAD) is UNREAD
    assert unpickle_nonpersistent(old, []) == zodbpickle_load(old)
    assert _kmi.load_state(bytearray(zodbpickle_dump(1)), UNREAD) is UNREAD


def test_persistent_references_are_never_read_by_the_fast_path():
    data = b'\x80\x02]q\x00K\x00Qa.'  # [persistent id 0]
    assert _kmi.load_state(data, UNREAD) is UNREAD
    with pytest.raises(Exception):
        unpickle_nonpersistent(data, [])
    assert unpickle_nonpersistent(data, ['ref']) == [['ref'][0]]


valid = states.map(zodbpickle_dump)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid, st.data())
def test_damaged_pickles_read_as_zodbpickle_reads_them_or_not_at_all(data, draw):
    """Truncated, flipped or spliced pickles: the fast reader never answers
    where zodbpickle fails, and never answers differently."""
    mutation = draw.draw(st.sampled_from(['truncate', 'flip', 'insert', 'garbage']))
    if mutation == 'truncate':
        data = data[:draw.draw(st.integers(0, len(data)))]
    elif mutation == 'flip':
        i = draw.draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw.draw(st.integers(1, 255))]) + data[i + 1:]
    elif mutation == 'insert':
        i = draw.draw(st.integers(0, len(data)))
        data = data[:i] + draw.draw(st.binary(min_size=1, max_size=6)) + data[i:]
    else:
        data = b'\x80\x02' + draw.draw(st.binary(max_size=60))
    loaded = _kmi.load_state(data, UNREAD)
    if loaded is UNREAD:
        return
    try:
        expected = zodbpickle_load(data)
    except Exception as e:  # pragma: no cover - a failure either way
        pytest.fail('fast reader answered %r where zodbpickle raised %r' % (loaded, e))
    assert same_object(loaded, expected) or (
        isinstance(loaded, float) and math.isnan(loaded) and math.isnan(expected))


def test_refcounts_do_not_leak():
    state = {'name': 'x' * 50, 'payload': b'\xff' * 64, 'tags': {'a': [1, 2.5, None]}}
    data = _kmi.dump_state(state)
    for _ in range(1000):
        _kmi.load_state(data, UNREAD)
        _kmi.dump_state(state)
    before = sys.getrefcount(state['name']), sys.getrefcount(state['payload'])
    for _ in range(1000):
        _kmi.load_state(data, UNREAD)
        _kmi.dump_state(state)
    assert (sys.getrefcount(state['name']), sys.getrefcount(state['payload'])) == before

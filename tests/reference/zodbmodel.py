"""Object model shared by the differential ZODB tests.

This module is imported under the top-level name ``zodbmodel`` both by the
test process (our keas.kmi) and by ``refworker.py`` running in the reference
virtualenv (keas.kmi 3.3.0), so that pickles written on one side name classes
the other side can import.  It must therefore import nothing but
``persistent`` and ``keas.kmi.persistent``.

A *spec* is a JSON document describing an object graph; ``build`` turns it
into persistent objects below a ZODB root mapping and ``describe`` turns a
(loaded or freshly built) graph back into a JSON-able description.  Two
graphs are equivalent when their descriptions are equal.

Spec layout::

    {"title": str,
     "items": [{"name": str,
                "container": "plain" | "folder",
                "data": <tagged value>,
                "refs": [item names],          # cross references, cycles allowed
                "friend": item name | null,
                "weak": item name | null,      # persistent.wref.WeakRef
                "child": <tagged dict> | null, # unencrypted PersistentMapping
                "kind": bool}]}                # store the Item class itself

Tagged values: JSON scalars and lists stand for themselves;
``{"bytes": hex}``, ``{"tuple": [...]}``, ``{"dict": [[k, v], ...]}`` and
``{"set": [...]}`` stand for bytes, tuples, dicts and frozensets.
"""
import binascii

import persistent
import persistent.list
import persistent.mapping
import persistent.wref

import keas.kmi.persistent


class Item(keas.kmi.persistent.EncryptedPersistent):
    """An encrypted object holding plain data and references."""


class Folder(keas.kmi.persistent.EncryptedPersistent):
    """An encrypted container: its whole child mapping lives in its state."""

    def __init__(self, title=''):
        self.title = title
        self.children = {}

    def __setitem__(self, name, value):
        self.children[name] = value
        self._p_changed = True

    def __getitem__(self, name):
        return self.children[name]

    def keys(self):
        return list(self.children)


class Plain(persistent.Persistent):
    """An ordinary (unencrypted) persistent object referring to items."""


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        (tag, payload), = value.items()
        if tag == 'bytes':
            return binascii.unhexlify(payload)
        if tag == 'tuple':
            return tuple(decode(v) for v in payload)
        if tag == 'dict':
            return {decode(k): decode(v) for k, v in payload}
        if tag == 'set':
            return frozenset(decode(v) for v in payload)
        raise ValueError('unknown tag %r' % tag)
    return value


def encode(value):
    if isinstance(value, bytes):
        return {'bytes': binascii.hexlify(value).decode('ascii')}
    if isinstance(value, tuple):
        return {'tuple': [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, (frozenset, set)):
        return {'set': sorted(encode(v) for v in value)}
    if isinstance(value, dict):
        return {'dict': [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, persistent.Persistent):
        return {'persistent': type(value).__name__}
    return value


ROOT_NAMES = ('plain', 'folder')


def build(root, spec):
    """Create the objects described by ``spec`` below the mapping ``root``."""
    plain = persistent.mapping.PersistentMapping()
    folder = Folder(spec.get('title', ''))
    root['plain'] = plain
    root['folder'] = folder
    containers = {'plain': plain, 'folder': folder}
    items = {}
    for entry in spec['items']:
        item = Item()
        item.__name__ = entry['name']
        container = containers[entry['container']]
        item.__parent__ = container
        container[entry['name']] = item
        items[entry['name']] = item
    for entry in spec['items']:
        item = items[entry['name']]
        item.data = decode(entry['data'])
        item.refs = [items[n] for n in entry['refs']]
        item.friend = items[entry['friend']] if entry['friend'] else None
        if entry['weak']:
            item.weak = persistent.wref.WeakRef(items[entry['weak']])
        else:
            item.weak = None
        if entry['child'] is not None:
            child = persistent.mapping.PersistentMapping(decode(entry['child']))
            child['owner'] = item
            item.child = child
        else:
            item.child = None
        item.kind = Item if entry['kind'] else None
    # an unencrypted object pointing into the encrypted graph
    index = Plain()
    index.all = persistent.list.PersistentList(items[e['name']] for e in spec['items'])
    root['index'] = index
    return items


def describe(root):
    """A JSON-able, order-stable description of the graph below ``root``."""
    containers = {name: root[name] for name in ROOT_NAMES}
    items = {}
    for cname, container in containers.items():
        for name in container.keys():
            items[name] = container[name]
    out = {
        'folder_class': type(containers['folder']).__name__,
        'title': containers['folder'].title,
        'index': [i.__name__ for i in root['index'].all],
        'index_identical': all(i is items[i.__name__] for i in root['index'].all),
        'items': {},
    }
    for name in sorted(items):
        item = items[name]
        parent = [c for c, obj in containers.items() if item.__parent__ is obj]
        weak = item.weak() if item.weak is not None else None
        desc = {
            'class': type(item).__name__,
            'name': item.__name__,
            'parent': parent[0] if parent else repr(item.__parent__),
            'data': encode(item.data),
            'refs': [r.__name__ for r in item.refs],
            'refs_identical': all(r is items[r.__name__] for r in item.refs),
            'friend': item.friend.__name__ if item.friend is not None else None,
            'friend_identical': (item.friend is None
                                 or item.friend is items[item.friend.__name__]),
            'weak': weak.__name__ if weak is not None else None,
            'weak_identical': weak is None or weak is items[weak.__name__],
            'kind': item.kind is Item,
        }
        if item.child is not None:
            child = dict(item.child)
            owner = child.pop('owner')
            desc['child'] = encode(child)
            desc['child_owner_identical'] = owner is item
            desc['child_class'] = type(item.child).__name__
        else:
            desc['child'] = None
        out['items'][name] = desc
    return out


def mutate(root, seed):
    """A deterministic change to an existing graph (for update round trips)."""
    items = {}
    for cname in ROOT_NAMES:
        container = root[cname]
        for name in container.keys():
            items[name] = container[name]
    names = sorted(items)
    n = len(names)
    for i, name in enumerate(names):
        if (i + seed) % 3 == 0:
            item = items[name]
            item.data = {'mutated': seed, 'previous': item.data}
            item.refs = item.refs[::-1] + [items[names[(i * 7 + seed) % n]]]
    new = Item()
    new.__name__ = 'added-%d' % seed
    new.__parent__ = root['folder']
    new.data = b'\x00\xff' * seed
    new.refs = [items[names[0]], new]
    new.friend = items[names[-1]]
    new.weak = persistent.wref.WeakRef(items[names[n // 2]])
    new.child = None
    new.kind = Item
    root['folder'][new.__name__] = new
    root['index'].all.append(new)

"""Key states and their transitions (NIST SP 800-57), and key metadata.

Every stored key has a state. A key without metadata (every key that
existed before this package) is active. The transitions allowed:

    active       -> deactivated, suspended, compromised, destroyed
    suspended    -> active (reactivate), deactivated, compromised, destroyed
    deactivated  -> compromised, destroyed
    compromised  -> destroyed
    destroyed    -> (none: the wrapped DEK is erased, the metadata kept)

What each state allows:

    state        DEK served (decrypt)   new encryption
    active       yes                    yes
    deactivated  yes                    no
    suspended    no                     no
    compromised  no (but to a re-encryption given an explicit flag)
    destroyed    no (410 Gone)
"""
import datetime
import time

ACTIVE = 'active'
DEACTIVATED = 'deactivated'
SUSPENDED = 'suspended'
COMPROMISED = 'compromised'
DESTROYED = 'destroyed'
STATES = (ACTIVE, DEACTIVATED, SUSPENDED, COMPROMISED, DESTROYED)

TRANSITIONS = {
    ACTIVE: (DEACTIVATED, SUSPENDED, COMPROMISED, DESTROYED),
    SUSPENDED: (ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED),
    DEACTIVATED: (COMPROMISED, DESTROYED),
    COMPROMISED: (DESTROYED,),
    DESTROYED: (),
}

# The response header that names the state of a key: the key server sends it
# with every DEK (active or deactivated) and every refusal of one.
KEY_STATE_HEADER = 'X-KMI-Key-State'

# What a facility may do with a key's DEK in each state.
SERVES = frozenset([ACTIVE, DEACTIVATED])
ENCRYPTS = frozenset([ACTIVE])


class KeyStateError(ValueError):
    """The key's state does not allow this: ``state`` says which it is."""

    def __init__(self, name, state, action):
        self.name, self.state, self.action = name, state, action
        super().__init__(describe_refusal(name, state, action))


class TransitionError(ValueError):
    """A state change that SP 800-57 (and this package) does not allow."""


def describe_refusal(name, state, action):
    reasons = {
        DEACTIVATED: 'it is deactivated: it still decrypts, but encrypts no more',
        SUSPENDED: 'it is suspended until it is reactivated',
        COMPROMISED: 'it is compromised',
        DESTROYED: 'it is destroyed: its wrapped DEK is erased',
    }
    return 'key %s cannot %s: %s' % (name, action, reasons.get(state, 'its state is ' + state))


def now_iso(t=None):
    """An RFC 3339 UTC time stamp with microseconds (every audit entry has one)."""
    t = time.time() if t is None else t
    seconds = int(t)
    return '%s.%06dZ' % (time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds)),
                         int((t - seconds) * 1e6))


def parse_iso(text):
    return datetime.datetime.strptime(text, '%Y-%m-%dT%H:%M:%S.%fZ').replace(
        tzinfo=datetime.timezone.utc).timestamp()


def new_metadata(name, kid=None, fingerprint=None, reason='generated', created=None,
                 state=ACTIVE, **extra):
    """The metadata of a key just created."""
    created = created or now_iso()
    meta = {
        'name': name,
        'state': state,
        'created': created,
        'kid': kid.hex() if isinstance(kid, bytes) else kid,
        'kek_fingerprint': fingerprint.hex() if isinstance(fingerprint, bytes) else fingerprint,
        'transitions': [{'state': state, 'date': created, 'reason': reason}],
    }
    meta.update(extra)
    return meta


def implicit_metadata(name, created=None):
    """The metadata of a key stored without any: active since it was stored."""
    return {'name': name, 'state': ACTIVE, 'created': created, 'kid': None,
            'kek_fingerprint': None, 'transitions': []}


def transition(meta, new_state, reason, when=None):
    """``meta`` moved to ``new_state``, or TransitionError if not allowed."""
    if new_state not in STATES:
        raise TransitionError('unknown key state %r (one of %s)' % (new_state, ', '.join(STATES)))
    old = meta['state']
    if new_state not in TRANSITIONS[old]:
        allowed = ', '.join(TRANSITIONS[old]) or 'none'
        raise TransitionError('key %s is %s: it cannot become %s (allowed: %s)'
                              % (meta['name'], old, new_state, allowed))
    if not reason:
        raise TransitionError('a state change needs a reason')
    changed = dict(meta)
    date = when or now_iso()
    changed['state'] = new_state
    changed['transitions'] = list(meta.get('transitions', ())) + [
        {'state': new_state, 'date': date, 'reason': reason}]
    return changed


def effective_state(meta, deactivate_after=None, now=None):
    """The state that applies now: a stored state, moved on by dates.

    ``deactivate_after`` (seconds, a cryptoperiod) makes an active key older
    than that deactivated; a rewrapped key kept for a grace period is
    destroyed once its ``destroy_after`` date has passed.
    """
    state = meta['state']
    now = time.time() if now is None else now
    destroy_after = meta.get('destroy_after')
    if destroy_after and state != DESTROYED and parse_iso(destroy_after) <= now:
        return DESTROYED
    if state == ACTIVE and deactivate_after and meta.get('created'):
        if parse_iso(meta['created']) + deactivate_after <= now:
            return DEACTIVATED
    return state


def parse_period(text):
    """A cryptoperiod such as ``365d``, ``12h``, ``90m`` or seconds, in seconds."""
    if text is None or str(text).strip() == '':
        return None
    text = str(text).strip().lower()
    units = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 7 * 86400, 'y': 365 * 86400}
    factor = units.get(text[-1])
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise ValueError('not a period: %r (e.g. 365d, 12h, 3600)' % text) from None
    if value <= 0:
        raise ValueError('a period must be positive: %r' % text)
    return value

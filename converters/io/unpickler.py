"""The opcodes ``torch.load(weights_only=True)`` runs, and only those, as a loop
(:class:`Machine`): the interpreter under both passes of :mod:`pth_reader` over a
``data.pkl`` (its scan and its torch-free reader).

Torch's weights-only unpickler runs 34 opcodes of pickle protocol 2 (no ``POP``,
``DUP``, text opcodes or protocol 4 framing); a pickle with any other is refused here,
as torch refuses it.  Stack, mark and memo work as in torch.  Nothing recurses over the
data, and each stack entry and memo slot carries its tuple nesting, so that no tuple
deeper than :data:`MAX_DEPTH` is ever built: hashing a tuple recurses in C without a
limit, and a dict key a million tuples deep (a megabyte of ``TUPLE1`` opcodes) crashes
the interpreter, torch.load included.  What globals, calls, ``BUILD``, item assignment,
appends and persistent ids do is up to the subclass.

:func:`describe` names a value from a pickle in an error message without its repr.
"""

from __future__ import annotations

import struct

from ..errors import ConvertError

# The deepest nesting accepted from data.pkl: tuples in tuples (here), and dicts from the
# top of a checkpoint down to a tensor, wrappers included (sources.unwrap).  Real
# checkpoints nest tuples two deep (a tensor's arguments hold its shape) and dicts three
# deep ({"net": {"cfm": state_dict}}).
MAX_DEPTH = 32


class NeedsTorch(Exception):
    """The checkpoint uses something the torch-free reader does not build (a global
    outside its list, another storage type, big-endian data): it is loaded with
    ``torch.load(weights_only=True)`` instead, which accepts or refuses it as before."""


def describe(x, limit: int = 60) -> str:
    """A value from a pickle, for an error message: strings and numbers shortened,
    anything else by its type alone.  Never the repr of a container, which could be
    deep (a RecursionError) or huge, and never a method looked up on it."""
    t = type(x)
    if t is str or t is bytes:
        return repr(x[:limit]) + ("..." if len(x) > limit else "")
    if t is int:
        return repr(x) if x.bit_length() <= 64 else f"an int of {x.bit_length()} bits"
    if t is float or t is bool or x is None:
        return repr(x)
    return f"a {t.__name__}"


def first_line(e: BaseException) -> str:
    """An exception's message, one line of at most 200 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _opname(op: int) -> str:
    import pickletools

    for o in pickletools.opcodes:
        if ord(o.code) == op:
            return f"{o.name} (0x{op:02x})"
    return f"0x{op:02x}"


class Machine:
    """Runs a ``data.pkl`` with exactly the opcodes ``torch.load(weights_only=True)``
    runs (its own unpickler's list: protocol 2 without ``POP``, ``DUP``, text opcodes
    or protocol 4 framing), with the same stack, mark and memo semantics; any other
    opcode is refused, as torch refuses it.  Iterative: nothing recurses over the data.

    Beside each stack entry and memo slot it keeps the entry's tuple nesting (0 for
    anything not a tuple), so a tuple more than :data:`MAX_DEPTH` deep is refused when
    it would be built, in constant time per item.  What globals, calls, ``BUILD``,
    appends, item assignments and persistent ids do is up to the subclass: the scan
    or the reader of :mod:`pth_reader`."""

    what = "data.pkl"  # the pickle, in messages

    def __init__(self, path: str, pkl: bytes, start: int = 0):
        self.path, self.data, self.pos = path, pkl, start
        self.stack: list = []
        self.depths: list[int] = []
        self.marks: list[tuple[list, list]] = []
        self.memo: dict[int, tuple[object, int]] = {}

    # -- what a subclass decides
    def empty(self, kind: type):
        """A new empty list, dict or set (``kind``)."""
        return kind()

    def global_(self, module: str, name: str):
        raise NotImplementedError

    def persistent(self, pid):
        raise NotImplementedError

    def call(self, func, args):
        raise NotImplementedError

    def new(self, cls, args):
        raise NotImplementedError

    def build(self, inst, state) -> None:
        raise NotImplementedError

    def set_items(self, target, items: list) -> None:
        raise NotImplementedError

    def extend(self, target, items: list) -> None:
        raise NotImplementedError

    # -- running
    def load(self):
        try:
            return self._run()
        except (ConvertError, NeedsTorch):
            raise
        except Exception as e:  # noqa: BLE001 - any other failure here means a damaged pickle
            raise ConvertError(f"{self.path}: damaged {self.what} ({type(e).__name__}: {first_line(e)})") from None

    def _run(self):
        data, ops, n = self.data, _OPS, len(self.data)
        while self.pos < n:
            op = data[self.pos]
            self.pos += 1
            if op == 0x2E:  # STOP
                self.depths.pop()
                return self.stack.pop()
            f = ops.get(op)
            if f is None:
                raise ConvertError(f"{self.path}: {self.what} uses the pickle opcode {_opname(op)}, which "
                                   "torch.load(weights_only=True) does not run (torch.save writes protocol 2); refused")
            f(self)
        raise ConvertError(f"{self.path}: {self.what} ends without a STOP opcode; the file is truncated or damaged")

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ConvertError(f"{self.path}: {self.what} ends inside an opcode; the file is truncated or damaged")
        b = self.data[self.pos:end]
        self.pos = end
        return b

    def _line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise ConvertError(f"{self.path}: {self.what} ends inside a GLOBAL opcode; the file is truncated or damaged")
        b = self.data[self.pos:end]
        self.pos = end + 1
        return b.decode("utf-8")

    def _push(self, x, depth: int = 0) -> None:
        self.stack.append(x)
        self.depths.append(depth)

    def _pop(self):
        self.depths.pop()
        return self.stack.pop()

    def _pop_mark(self) -> tuple[list, list]:
        items, depths = self.stack, self.depths
        self.stack, self.depths = self.marks.pop()
        return items, depths

    def _nest(self, depths) -> int:
        d = 1 + max(depths, default=0)
        if d > MAX_DEPTH:
            raise ConvertError(f"{self.path}: {self.what} nests tuples over {MAX_DEPTH} deep; a checkpoint's tuples are "
                               "shapes and arguments, two deep, and hashing a deep one crashes Python (torch.load "
                               "too); refused")
        return d


def _op(code: bytes):
    def register(f):
        _OPS[code[0]] = f
        return f
    return register


_OPS: dict = {}


@_op(b"\x80")  # PROTO: torch reads any protocol number
def _proto(m):
    m._take(1)


@_op(b"(")  # MARK
def _mark(m):
    m.marks.append((m.stack, m.depths))
    m.stack, m.depths = [], []


@_op(b"c")  # GLOBAL, with Python 2 names mapped as torch maps them
def _global(m):
    import _compat_pickle

    module, name = m._line(), m._line()
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    m._push(m.global_(module, name))


@_op(b"\x81")  # NEWOBJ
def _newobj(m):
    args = m._pop()
    cls = m._pop()
    m._push(m.new(cls, args))


@_op(b"R")  # REDUCE
def _reduce(m):
    args = m._pop()
    func = m.stack[-1]
    m.stack[-1], m.depths[-1] = m.call(func, args), 0


@_op(b"b")  # BUILD
def _build(m):
    state = m._pop()
    m.build(m.stack[-1], state)


@_op(b"a")  # APPEND
def _append(m):
    item = m._pop()
    m.extend(m.stack[-1], [item])


@_op(b"e")  # APPENDS
def _appends(m):
    items, _ = m._pop_mark()
    m.extend(m.stack[-1], items)


@_op(b"s")  # SETITEM
def _setitem(m):
    v = m._pop()
    k = m._pop()
    m.set_items(m.stack[-1], [k, v])


@_op(b"u")  # SETITEMS
def _setitems(m):
    items, _ = m._pop_mark()
    if len(items) % 2:
        raise ConvertError(f"{m.path}: {m.what} has a SETITEMS with a key and no value; the file is damaged")
    m.set_items(m.stack[-1], items)


@_op(b"t")  # TUPLE
def _tuple(m):
    items, depths = m._pop_mark()
    m._push(tuple(items), m._nest(depths))


@_op(b"\x85")  # TUPLE1
def _tuple1(m):
    m.depths[-1] = m._nest(m.depths[-1:])
    m.stack[-1] = (m.stack[-1],)


@_op(b"\x86")  # TUPLE2
def _tuple2(m):
    d = m._nest(m.depths[-2:])
    b = m._pop()
    m.stack[-1], m.depths[-1] = (m.stack[-1], b), d


@_op(b"\x87")  # TUPLE3
def _tuple3(m):
    d = m._nest(m.depths[-3:])
    c = m._pop()
    b = m._pop()
    m.stack[-1], m.depths[-1] = (m.stack[-1], b, c), d


for _code, _value in ((b"N", None), (b"\x89", False), (b"\x88", True)):
    _op(_code)(lambda m, v=_value: m._push(v))
_op(b")")(lambda m: m._push((), 1))  # EMPTY_TUPLE
_op(b"]")(lambda m: m._push(m.empty(list)))  # EMPTY_LIST
_op(b"}")(lambda m: m._push(m.empty(dict)))  # EMPTY_DICT
_op(b"\x8f")(lambda m: m._push(m.empty(set)))  # EMPTY_SET
_op(b"J")(lambda m: m._push(struct.unpack("<i", m._take(4))[0]))  # BININT
_op(b"K")(lambda m: m._push(m._take(1)[0]))  # BININT1
_op(b"M")(lambda m: m._push(struct.unpack("<H", m._take(2))[0]))  # BININT2
_op(b"G")(lambda m: m._push(struct.unpack(">d", m._take(8))[0]))  # BINFLOAT
_op(b"X")(lambda m: m._push(str(m._take(struct.unpack("<I", m._take(4))[0]), "utf-8", "surrogatepass")))  # BINUNICODE
_op(b"U")(lambda m: m._push(m._take(m._take(1)[0]).decode("utf-8")))  # SHORT_BINSTRING, decoded as torch.load does
_op(b"\x8a")(lambda m: m._push(int.from_bytes(m._take(m._take(1)[0]), "little", signed=True)))  # LONG1


@_op(b"Q")  # BINPERSID
def _binpersid(m):
    m._push(m.persistent(m._pop()))


def _get(m, idx: int) -> None:
    if idx not in m.memo:
        raise ConvertError(f"{m.path}: {m.what} refers to memo slot {idx}, which it never filled; the file is damaged")
    m._push(*m.memo[idx])


def _put(m, idx: int) -> None:
    m.memo[idx] = (m.stack[-1], m.depths[-1])


_op(b"h")(lambda m: _get(m, m._take(1)[0]))  # BINGET
_op(b"j")(lambda m: _get(m, struct.unpack("<I", m._take(4))[0]))  # LONG_BINGET
_op(b"q")(lambda m: _put(m, m._take(1)[0]))  # BINPUT
_op(b"r")(lambda m: _put(m, struct.unpack("<I", m._take(4))[0]))  # LONG_BINPUT

"""The pickle format of one Grok-1 tensor file: a safe parser and a byte-exact writer.

Each file of the released checkpoint is one protocol-4 pickle whose top-level
object is either a numpy array or a `__main__.QuantizedWeight8bit` built with
`__new__` plus the state dict `{'weight': int8 array, 'scales': bfloat16 array}`.

`PickleParser` never runs pickle code. It interprets the opcodes symbolically
and returns where each array's bytes lie (`ArrayInfo`), skipping payloads by
length. Only the globals in `ALLOWED_GLOBALS` are accepted, and only the way
the format uses them. Any other global, and any opcode outside the small set
these files use, raises `InvalidPickle` before anything is called.

`PickleWriter` writes the bytes that CPython 3.11's `pickle.dump` writes for
numpy 1.26 arrays and the `QuantizedWeight8bit` dataclass.

`checkpoint.py` builds the file-level API (errors naming files and
parameters, reading array regions, whole checkpoints) on top of this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from typing import Any, Callable, Optional, Union

import ml_dtypes
import numpy as np


# ---------------------------------------------------------------------------
# Parsed pickle contents


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """A numpy array stored in a pickle: its shape, dtype and the location of its raw bytes.

    `offset` and `nbytes` locate the payload in the file. The bytes are in
    Fortran order when `fortran_order` is true, as numpy writes arrays that are
    Fortran- but not C-contiguous.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclasses.dataclass(frozen=True)
class QuantizedInfo:
    """A stored `QuantizedWeight8bit`: its `weight` and `scales` arrays."""

    weight: ArrayInfo
    scales: ArrayInfo


TensorInfo = Union[ArrayInfo, QuantizedInfo]


# ---------------------------------------------------------------------------
# Pickle opcodes (names as in CPython's Lib/pickle.py)

_OPCODE_NAMES = {
    b"(": "MARK", b".": "STOP", b"0": "POP", b"1": "POP_MARK", b"2": "DUP",
    b"F": "FLOAT", b"I": "INT", b"J": "BININT", b"K": "BININT1", b"L": "LONG",
    b"M": "BININT2", b"N": "NONE", b"P": "PERSID", b"Q": "BINPERSID",
    b"R": "REDUCE", b"S": "STRING", b"T": "BINSTRING", b"U": "SHORT_BINSTRING",
    b"V": "UNICODE", b"X": "BINUNICODE", b"a": "APPEND", b"b": "BUILD",
    b"c": "GLOBAL", b"d": "DICT", b"}": "EMPTY_DICT", b"e": "APPENDS",
    b"g": "GET", b"h": "BINGET", b"i": "INST", b"j": "LONG_BINGET",
    b"l": "LIST", b"]": "EMPTY_LIST", b"o": "OBJ", b"p": "PUT", b"q": "BINPUT",
    b"r": "LONG_BINPUT", b"s": "SETITEM", b"t": "TUPLE", b")": "EMPTY_TUPLE",
    b"u": "SETITEMS", b"G": "BINFLOAT", b"\x80": "PROTO", b"\x81": "NEWOBJ",
    b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"\x85": "TUPLE1",
    b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"\x88": "NEWTRUE", b"\x89": "NEWFALSE",
    b"\x8a": "LONG1", b"\x8b": "LONG4", b"B": "BINBYTES", b"C": "SHORT_BINBYTES",
    b"\x8c": "SHORT_BINUNICODE", b"\x8d": "BINUNICODE8", b"\x8e": "BINBYTES8",
    b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS", b"\x91": "FROZENSET",
    b"\x92": "NEWOBJ_EX", b"\x93": "STACK_GLOBAL", b"\x94": "MEMOIZE",
    b"\x95": "FRAME", b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
}
_OPCODES = {name: code for code, name in _OPCODE_NAMES.items()}

# Frames of protocol 4: the pickler closes a frame once it reaches this size,
# and writes byte strings of at least this size outside any frame.
_FRAME_SIZE_TARGET = 64 * 1024
# A frame shorter than this is written without its FRAME header.
_FRAME_SIZE_MIN = 4

# A tensor file's header has about 80 opcodes, so more than this means the
# file is something else (and parsing it in Python would take very long).
_MAX_OPCODES = 100_000


# ---------------------------------------------------------------------------
# Symbolic values of the parser. Nothing named in a pickle is ever imported or
# called: these stand for the allowed globals and for the objects they build.


class _Global:
    """An allowed global, identified by the role it plays in the format."""

    def __init__(self, role: str):
        self.role = role

    def __repr__(self):
        return f"<global {self.role}>"


_QUANTIZED_CLASS = _Global("QuantizedWeight8bit")
_RECONSTRUCT = _Global("ndarray._reconstruct")
_NDARRAY = _Global("numpy.ndarray")
_DTYPE = _Global("numpy.dtype")
_BFLOAT16 = _Global("bfloat16")

# NOTE: `jax.numpy.bfloat16` is accepted because jax re-exports the type under
# that name. No file seen so far names a `jax._src...` module, so none is accepted.
ALLOWED_GLOBALS = {
    ("__main__", "QuantizedWeight8bit"): _QUANTIZED_CLASS,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("jax.numpy", "bfloat16"): _BFLOAT16,
}

# numpy dtype codes accepted in a file: bool, signed and unsigned integers, floats.
DTYPE_CODE_PATTERN = re.compile(r"^(b1|i[1248]|u[1248]|f[248])$")


@dataclasses.dataclass
class _Bytes:
    """A bytes object of the pickle, by its position in the file."""

    offset: int
    length: int


class _DtypeBuilder:
    """`numpy.dtype(code, align, copy)` before and after its BUILD."""

    def __init__(self, code: Union[str, _Global]):
        self.code = code
        self.dtype: Optional[np.dtype] = None


class _ArrayBuilder:
    """`_reconstruct(ndarray, (0,), b'b')` before and after its BUILD."""

    def __init__(self):
        self.info: Optional[ArrayInfo] = None


class _QuantizedBuilder:
    """`QuantizedWeight8bit.__new__()` before and after its BUILD."""

    def __init__(self):
        self.info: Optional[QuantizedInfo] = None


class InvalidPickle(Exception):
    """The file is not a valid tensor pickle. The message omits the file name."""


class DisallowedGlobal(InvalidPickle):
    """The pickle names a global outside `ALLOWED_GLOBALS`."""


class TruncatedPickle(Exception):
    """The pickle needs `required` bytes but the file is shorter."""

    def __init__(self, detail: str, required: int):
        super().__init__(detail)
        self.detail = detail
        self.required = required


def _describe(value) -> str:
    if isinstance(value, _Bytes):
        return f"a {value.length}-byte bytes object"
    if isinstance(value, _Global):
        return repr(value)
    if isinstance(value, _ArrayBuilder):
        return "an array"
    if isinstance(value, _DtypeBuilder):
        return "a dtype"
    if isinstance(value, _QuantizedBuilder):
        return "a QuantizedWeight8bit"
    return f"{type(value).__name__} {value!r}"[:80]


class PickleParser:
    """A stack machine over the opcodes of a tensor pickle that builds only descriptions.

    `data` is any buffer of the whole file (an mmap). Reads past `size` raise
    `TruncatedPickle`. Every opcode not handled here raises `InvalidPickle`.
    """

    def __init__(self, data, size: int):
        self.data = data
        self.size = size
        self.pos = 0
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.handlers: dict[bytes, Callable[[], None]] = {
            _OPCODES[name]: getattr(self, "_op_" + name.lower())
            for name in (
                "PROTO", "FRAME", "SHORT_BINUNICODE", "BINUNICODE", "MEMOIZE",
                "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "STACK_GLOBAL",
                "GLOBAL", "BININT", "BININT1", "BININT2", "LONG1", "MARK", "TUPLE",
                "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "SHORT_BINBYTES",
                "BINBYTES", "BINBYTES8", "NEWTRUE", "NEWFALSE", "NONE", "REDUCE",
                "BUILD", "NEWOBJ", "EMPTY_DICT", "SETITEM", "SETITEMS",
            )
        }

    # -- reading -----------------------------------------------------------

    def _read(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.size:
            raise TruncatedPickle(f"the pickle ends early at byte {self.size:,}", end + 1)
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _read_uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "little")

    def _read_line(self) -> str:
        # GLOBAL arguments are short text lines; bound the search to keep
        # a corrupt file from being scanned to its end.
        end = min(self.pos + 256, self.size)
        newline = self.data.find(b"\n", self.pos, end)
        if newline < 0:
            if end == self.size:
                raise TruncatedPickle("the pickle ends inside a GLOBAL opcode", self.size + 1)
            raise InvalidPickle(f"GLOBAL argument at offset {self.pos} is longer than 256 bytes")
        line = self.data[self.pos:newline]
        self.pos = newline + 1
        try:
            return line.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidPickle(f"GLOBAL argument at offset {self.pos} is not ASCII") from None

    def _skip_payload(self, length: int) -> _Bytes:
        """Skip `length` payload bytes without touching them."""
        start = self.pos
        if start + length > self.size:
            raise TruncatedPickle(
                f"the pickle declares a {length:,}-byte payload at offset {start:,}",
                start + length + 1,
            )
        self.pos = start + length
        return _Bytes(start, length)

    def _pop(self):
        if not self.stack or (self.marks and len(self.stack) == self.marks[-1]):
            raise InvalidPickle(f"stack underflow at offset {self.pos - 1}")
        return self.stack.pop()

    def _pop_mark(self) -> list:
        if not self.marks:
            raise InvalidPickle(f"no MARK before the opcode at offset {self.pos - 1}")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def parse_global_at(self, offset: int) -> None:
        """Parse the argument lines of a GLOBAL opcode at `offset`; raise `DisallowedGlobal` if not allowed."""
        self.pos = offset + 1
        self._op_global()

    # -- main loop ---------------------------------------------------------

    def parse(self) -> TensorInfo:
        for _ in range(_MAX_OPCODES):
            opcode_offset = self.pos
            code = self._read(1)
            if code == b".":
                return self._finish(opcode_offset)
            handler = self.handlers.get(code)
            if handler is None:
                name = _OPCODE_NAMES.get(code, "unknown opcode")
                raise InvalidPickle(
                    f"unsupported pickle opcode {name} (0x{code[0]:02x}) at offset {opcode_offset}"
                )
            handler()
        raise InvalidPickle(f"no STOP opcode within the first {_MAX_OPCODES} opcodes")

    def _finish(self, stop_offset: int) -> TensorInfo:
        if self.marks or len(self.stack) != 1:
            raise InvalidPickle(f"STOP at offset {stop_offset} leaves {len(self.stack)} objects on the stack")
        if self.pos != self.size:
            raise InvalidPickle(
                f"{self.size - self.pos:,} unexpected bytes follow the end of the pickle "
                f"at offset {self.pos:,}"
            )
        result = self.stack[0]
        if isinstance(result, (_ArrayBuilder, _QuantizedBuilder)) and result.info is not None:
            return result.info
        raise InvalidPickle(
            f"the pickle contains {_describe(result)}, not a numpy array or QuantizedWeight8bit"
        )

    # -- opcodes -----------------------------------------------------------

    def _op_proto(self):
        protocol = self._read(1)[0]
        if not 2 <= protocol <= 5:
            raise InvalidPickle(f"pickle protocol {protocol} is not supported")

    def _op_frame(self):
        length = self._read_uint(8)
        if self.pos + length > self.size:
            raise TruncatedPickle(
                f"a {length:,}-byte pickle frame starts at offset {self.pos:,}",
                self.pos + length,
            )

    def _op_short_binunicode(self):
        self._push_text(self._read(self._read(1)[0]))

    def _op_binunicode(self):
        self._push_text(self._read(self._read_uint(4)))

    def _push_text(self, raw: bytes):
        try:
            self.stack.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidPickle(f"invalid UTF-8 string before offset {self.pos}") from None

    def _op_memoize(self):
        if not self.stack:
            raise InvalidPickle(f"MEMOIZE with an empty stack at offset {self.pos - 1}")
        self.memo[len(self.memo)] = self.stack[-1]

    def _put(self, index: int):
        if not self.stack:
            raise InvalidPickle(f"PUT with an empty stack at offset {self.pos - 1}")
        self.memo[index] = self.stack[-1]

    def _op_binput(self):
        self._put(self._read(1)[0])

    def _op_long_binput(self):
        self._put(self._read_uint(4))

    def _get(self, index: int):
        if index not in self.memo:
            raise InvalidPickle(f"memo entry {index} read before it was stored (offset {self.pos})")
        self.stack.append(self.memo[index])

    def _op_binget(self):
        self._get(self._read(1)[0])

    def _op_long_binget(self):
        self._get(self._read_uint(4))

    def _push_global(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise InvalidPickle(f"STACK_GLOBAL of non-strings before offset {self.pos}")
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise DisallowedGlobal(
                f"the pickle references the global {module}.{name}, which is not part of the "
                "Grok-1 checkpoint format; it was not imported or called"
            )
        self.stack.append(target)

    def _op_stack_global(self):
        name = self._pop()
        module = self._pop()
        self._push_global(module, name)

    def _op_global(self):
        module = self._read_line()
        name = self._read_line()
        self._push_global(module, name)

    def _op_binint(self):
        self.stack.append(int.from_bytes(self._read(4), "little", signed=True))

    def _op_binint1(self):
        self.stack.append(self._read(1)[0])

    def _op_binint2(self):
        self.stack.append(self._read_uint(2))

    def _op_long1(self):
        self.stack.append(int.from_bytes(self._read(self._read(1)[0]), "little", signed=True))

    def _op_mark(self):
        self.marks.append(len(self.stack))

    def _op_tuple(self):
        self.stack.append(tuple(self._pop_mark()))

    def _pop_tuple(self, n: int):
        items = [self._pop() for _ in range(n)]
        self.stack.append(tuple(reversed(items)))

    def _op_tuple1(self):
        self._pop_tuple(1)

    def _op_tuple2(self):
        self._pop_tuple(2)

    def _op_tuple3(self):
        self._pop_tuple(3)

    def _op_empty_tuple(self):
        self.stack.append(())

    def _op_short_binbytes(self):
        self.stack.append(self._skip_payload(self._read(1)[0]))

    def _op_binbytes(self):
        self.stack.append(self._skip_payload(self._read_uint(4)))

    def _op_binbytes8(self):
        self.stack.append(self._skip_payload(self._read_uint(8)))

    def _op_newtrue(self):
        self.stack.append(True)

    def _op_newfalse(self):
        self.stack.append(False)

    def _op_none(self):
        self.stack.append(None)

    def _op_empty_dict(self):
        self.stack.append({})

    def _set_items(self, target, items: list):
        if not isinstance(target, dict):
            raise InvalidPickle(f"SETITEM(S) on {_describe(target)} at offset {self.pos - 1}")
        for key, value in zip(items[::2], items[1::2]):
            if not isinstance(key, str):
                raise InvalidPickle(f"dict key {_describe(key)} at offset {self.pos - 1} is not a string")
            target[key] = value

    def _op_setitem(self):
        value = self._pop()
        key = self._pop()
        self._set_items(self._peek(), [key, value])

    def _op_setitems(self):
        items = self._pop_mark()
        if len(items) % 2:
            raise InvalidPickle(f"SETITEMS with an odd number of items at offset {self.pos - 1}")
        self._set_items(self._peek(), items)

    def _peek(self):
        if not self.stack:
            raise InvalidPickle(f"stack underflow at offset {self.pos - 1}")
        return self.stack[-1]

    def _op_reduce(self):
        args = self._pop()
        function = self._pop()
        if function is _RECONSTRUCT:
            self.stack.append(self._reconstruct(args))
        elif function is _DTYPE:
            self.stack.append(self._new_dtype(args))
        else:
            raise InvalidPickle(
                f"REDUCE calls {_describe(function)} at offset {self.pos - 1}; the format "
                "calls only numpy's _reconstruct and numpy.dtype"
            )

    def _reconstruct(self, args) -> _ArrayBuilder:
        valid = (
            isinstance(args, tuple)
            and len(args) == 3
            and args[0] is _NDARRAY
            and args[1] == (0,)
            and isinstance(args[2], _Bytes)
            and self.data[args[2].offset:args[2].offset + args[2].length] == b"b"
        )
        if not valid:
            raise InvalidPickle(
                f"_reconstruct at offset {self.pos - 1} has arguments "
                f"{tuple(_describe(a) for a in args) if isinstance(args, tuple) else _describe(args)}, "
                "expected (numpy.ndarray, (0,), b'b')"
            )
        return _ArrayBuilder()

    def _new_dtype(self, args) -> _DtypeBuilder:
        valid = (
            isinstance(args, tuple)
            and len(args) == 3
            and isinstance(args[1], bool)
            and isinstance(args[2], bool)
            and (args[0] is _BFLOAT16 or (isinstance(args[0], str) and DTYPE_CODE_PATTERN.match(args[0])))
        )
        if not valid:
            raise InvalidPickle(
                f"numpy.dtype at offset {self.pos - 1} has arguments "
                f"{tuple(_describe(a) for a in args) if isinstance(args, tuple) else _describe(args)}; "
                "only bool, integer, float and bfloat16 dtypes are supported"
            )
        return _DtypeBuilder(args[0])

    def _op_newobj(self):
        args = self._pop()
        cls = self._pop()
        if cls is not _QUANTIZED_CLASS or args != ():
            raise InvalidPickle(
                f"NEWOBJ of {_describe(cls)} with {_describe(args)} at offset {self.pos - 1}; "
                "the format creates only QuantizedWeight8bit with no arguments"
            )
        self.stack.append(_QuantizedBuilder())

    def _op_build(self):
        state = self._pop()
        target = self._peek()
        if isinstance(target, _DtypeBuilder) and target.dtype is None:
            target.dtype = self._dtype_from_state(target.code, state)
        elif isinstance(target, _ArrayBuilder) and target.info is None:
            target.info = self._array_from_state(state)
        elif isinstance(target, _QuantizedBuilder) and target.info is None:
            target.info = self._quantized_from_state(state)
        else:
            raise InvalidPickle(f"BUILD of {_describe(target)} at offset {self.pos - 1}")

    def _dtype_from_state(self, code, state) -> np.dtype:
        # numpy 1.x and 2.x: (3, byte order, subarray, names, fields, itemsize,
        # alignment, flags); itemsize and alignment are -1 for builtin dtypes.
        valid = (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
            and all(isinstance(v, int) for v in state[5:8])
        )
        if not valid:
            raise InvalidPickle(f"unsupported dtype state {state!r:.120} before offset {self.pos}")
        byte_order = state[1]
        if code is _BFLOAT16:
            dtype = np.dtype(ml_dtypes.bfloat16)
            if state[5] != dtype.itemsize:
                raise InvalidPickle(f"bfloat16 dtype with item size {state[5]} before offset {self.pos}")
        else:
            dtype = np.dtype(code)
        if byte_order in ("<", ">") and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(byte_order)
        return dtype

    def _array_from_state(self, state) -> ArrayInfo:
        # ndarray.__setstate__: (version, shape, dtype, is_fortran, raw bytes)
        valid = (
            isinstance(state, tuple)
            and len(state) == 5
            and state[0] == 1
            and isinstance(state[1], tuple)
            and all(type(d) is int and d >= 0 for d in state[1])
            and isinstance(state[2], _DtypeBuilder)
            and state[2].dtype is not None
            and isinstance(state[3], bool)
            and isinstance(state[4], _Bytes)
        )
        if not valid:
            state_description = tuple(_describe(v) for v in state) if isinstance(state, tuple) else _describe(state)
            raise InvalidPickle(f"unsupported array state {state_description} before offset {self.pos}")
        shape, dtype, fortran_order, payload = state[1], state[2].dtype, state[3], state[4]
        expected = math.prod(shape) * dtype.itemsize
        if payload.length != expected:
            raise InvalidPickle(
                f"the array payload at offset {payload.offset:,} has {payload.length:,} bytes, "
                f"but shape {shape} of {dtype} needs {expected:,}"
            )
        return ArrayInfo(shape, dtype, fortran_order, payload.offset, payload.length)

    def _quantized_from_state(self, state) -> QuantizedInfo:
        valid = (
            isinstance(state, dict)
            and set(state) == {"weight", "scales"}
            and all(isinstance(v, _ArrayBuilder) and v.info is not None for v in state.values())
        )
        if not valid:
            state_description = sorted(state) if isinstance(state, dict) else _describe(state)
            raise InvalidPickle(
                f"QuantizedWeight8bit state {state_description} before offset {self.pos}; "
                "expected a dict of the arrays 'weight' and 'scales'"
            )
        return QuantizedInfo(weight=state["weight"].info, scales=state["scales"].info)


# ---------------------------------------------------------------------------
# Writing: a minimal protocol-4 pickler that produces the bytes CPython's
# pickle writes for numpy 1.x arrays and QuantizedWeight8bit.


@dataclasses.dataclass(frozen=True, eq=False)
class _WriterGlobal:
    module: str
    name: str


# CPython memoizes strings by identity. numpy 1.x gives `ndarray` and `dtype`
# the same interned module string 'numpy', so the second use is a BINGET.
_NUMPY_MODULE = "numpy"
_WRITE_RECONSTRUCT = _WriterGlobal("numpy.core.multiarray", "_reconstruct")
_WRITE_NDARRAY = _WriterGlobal(_NUMPY_MODULE, "ndarray")
_WRITE_DTYPE = _WriterGlobal(_NUMPY_MODULE, "dtype")
_WRITE_BFLOAT16 = _WriterGlobal("ml_dtypes", "bfloat16")
_WRITE_QUANTIZED = _WriterGlobal("__main__", "QuantizedWeight8bit")


@dataclasses.dataclass(eq=False)
class _WriterReduce:
    """An object pickled as `function(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), then BUILD(state)."""

    callable: _WriterGlobal
    args: tuple
    state: Any
    newobj: bool = False


@dataclasses.dataclass(eq=False)
class _WriterPayload:
    """The raw bytes of an array: `array` is None when only the size is counted."""

    nbytes: int
    array: Optional[np.ndarray]
    order: str


class PickleWriter:
    """Writes one object graph of tuples, dicts, ints, strings and the `_Writer*` records.

    Follows CPython 3.11's C pickler for protocol 4. It writes MEMOIZE after
    every string, bytes, non-empty tuple, global and reduced object, and looks
    objects up in the memo by identity. A frame is closed at the start of the
    first `save` after it reaches 64 KiB, and byte strings of 64 KiB or more
    are written outside frames. With `sink=None` only `size` is computed.
    """

    def __init__(self, sink: Optional[Callable[[Any], Any]]):
        self.sink = sink
        self.size = 0
        self.frame = bytearray()
        self.framing = False
        self.memo: dict[int, tuple[int, Any]] = {}

    def dump(self, obj) -> None:
        self._write_direct(_OPCODES["PROTO"] + b"\x04")
        self.framing = True
        self.save(obj)
        self._write(_OPCODES["STOP"])
        self._commit_frame(force=True)
        self.framing = False

    # -- output --------------------------------------------------------------

    def _write_direct(self, data) -> None:
        self.size += len(data)
        if self.sink is not None:
            self.sink(data)

    def _write(self, data: bytes) -> None:
        if self.framing:
            self.frame += data
        else:
            self._write_direct(data)

    def _commit_frame(self, force: bool = False) -> None:
        if not self.frame or (len(self.frame) < _FRAME_SIZE_TARGET and not force):
            return
        if len(self.frame) >= _FRAME_SIZE_MIN:
            self._write_direct(_OPCODES["FRAME"] + struct.pack("<Q", len(self.frame)))
        self._write_direct(bytes(self.frame))
        self.frame = bytearray()

    # -- memo ------------------------------------------------------------------

    def _memoize(self, obj) -> None:
        self._write(_OPCODES["MEMOIZE"])
        self.memo[id(obj)] = (len(self.memo), obj)

    def _memo_get(self, index: int) -> bytes:
        if index < 256:
            return _OPCODES["BINGET"] + bytes([index])
        return _OPCODES["LONG_BINGET"] + struct.pack("<I", index)

    # -- objects ---------------------------------------------------------------

    def save(self, obj) -> None:
        self._commit_frame()
        entry = self.memo.get(id(obj))
        if entry is not None:
            self._write(self._memo_get(entry[0]))
            return

        if obj is None:
            self._write(_OPCODES["NONE"])
        elif obj is True or obj is False:
            self._write(_OPCODES["NEWTRUE"] if obj else _OPCODES["NEWFALSE"])
        elif type(obj) is int:
            self._save_int(obj)
        elif type(obj) is str:
            self._save_str(obj)
        elif type(obj) is bytes or isinstance(obj, _WriterPayload):
            self._save_bytes(obj)
        elif type(obj) is tuple:
            self._save_tuple(obj)
        elif type(obj) is dict:
            self._save_dict(obj)
        elif isinstance(obj, _WriterGlobal):
            self.save(obj.module)
            self.save(obj.name)
            self._write(_OPCODES["STACK_GLOBAL"])
            self._memoize(obj)
        elif isinstance(obj, _WriterReduce):
            self._save_reduce(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} into a tensor pickle")

    def _save_int(self, value: int) -> None:
        if 0 <= value <= 0xFF:
            self._write(_OPCODES["BININT1"] + bytes([value]))
        elif 0 <= value <= 0xFFFF:
            self._write(_OPCODES["BININT2"] + struct.pack("<H", value))
        elif -0x80000000 <= value <= 0x7FFFFFFF:
            self._write(_OPCODES["BININT"] + struct.pack("<i", value))
        else:
            encoded = _encode_long(value)
            if len(encoded) > 255:
                raise ValueError(f"integer {value} is too large for a tensor pickle")
            self._write(_OPCODES["LONG1"] + bytes([len(encoded)]) + encoded)

    def _save_str(self, value: str) -> None:
        encoded = value.encode("utf-8")
        if len(encoded) < 256:
            self._write(_OPCODES["SHORT_BINUNICODE"] + bytes([len(encoded)]) + encoded)
        else:
            self._write(_OPCODES["BINUNICODE"] + struct.pack("<I", len(encoded)) + encoded)
        self._memoize(value)

    def _save_bytes(self, value) -> None:
        length = value.nbytes if isinstance(value, _WriterPayload) else len(value)
        if length < 256:
            header = _OPCODES["SHORT_BINBYTES"] + bytes([length])
        elif length <= 0xFFFFFFFF:
            header = _OPCODES["BINBYTES"] + struct.pack("<I", length)
        else:
            header = _OPCODES["BINBYTES8"] + struct.pack("<Q", length)

        if length >= _FRAME_SIZE_TARGET and self.framing:
            # Large byte strings go straight to the output, between frames.
            self._commit_frame(force=True)
            self._write_direct(header)
            self._write_payload(value)
        else:
            self._write(header + (_payload_bytes(value) if isinstance(value, _WriterPayload) else value))
        self._memoize(value)

    def _write_payload(self, value) -> None:
        if not isinstance(value, _WriterPayload):
            self._write_direct(value)
            return
        self.size += value.nbytes
        if self.sink is not None and value.array is not None:
            write_array_bytes(self.sink, value.array, value.order)

    def _save_tuple(self, value: tuple) -> None:
        if not value:
            self._write(_OPCODES["EMPTY_TUPLE"])
            return
        if len(value) <= 3:
            for item in value:
                self.save(item)
            self._write(_OPCODES[f"TUPLE{len(value)}"])
        else:
            self._write(_OPCODES["MARK"])
            for item in value:
                self.save(item)
            self._write(_OPCODES["TUPLE"])
        self._memoize(value)

    def _save_dict(self, value: dict) -> None:
        self._write(_OPCODES["EMPTY_DICT"])
        self._memoize(value)
        items = list(value.items())
        # CPython writes items in batches of 1000, a single item with SETITEM.
        for start in range(0, len(items), 1000):
            batch = items[start:start + 1000]
            if len(batch) == 1:
                self.save(batch[0][0])
                self.save(batch[0][1])
                self._write(_OPCODES["SETITEM"])
            else:
                self._write(_OPCODES["MARK"])
                for key, item in batch:
                    self.save(key)
                    self.save(item)
                self._write(_OPCODES["SETITEMS"])

    def _save_reduce(self, value: _WriterReduce) -> None:
        self.save(value.callable)
        self.save(value.args)
        self._write(_OPCODES["NEWOBJ"] if value.newobj else _OPCODES["REDUCE"])
        self._memoize(value)
        if value.state is not None:
            self.save(value.state)
            self._write(_OPCODES["BUILD"])


def _encode_long(value: int) -> bytes:
    """Two's complement little-endian bytes of `value`, as pickle's LONG1 stores it."""
    if value == 0:
        return b""
    length = (value.bit_length() >> 3) + 1
    encoded = value.to_bytes(length, "little", signed=True)
    if value < 0 and length > 1 and encoded[-1] == 0xFF and (encoded[-2] & 0x80):
        encoded = encoded[:-1]
    return encoded


def _array_bytes_view(array: np.ndarray, order: str) -> np.ndarray:
    """Return a flat uint8 view (or copy when needed) of `array`'s bytes in `order`."""
    flat = np.ravel(array, order=order)
    return flat.view(np.uint8)


def _payload_bytes(payload: _WriterPayload) -> bytes:
    if payload.array is None:
        return bytes(payload.nbytes)
    return _array_bytes_view(payload.array, payload.order).tobytes()


def write_array_bytes(sink: Callable[[Any], Any], array: np.ndarray, order: str) -> None:
    sink(memoryview(_array_bytes_view(array, order)))


def _dtype_reduction(dtype: np.dtype) -> _WriterReduce:
    """Build the pickle of `dtype` as numpy 1.26 writes it: `numpy.dtype(code, False, True)` + BUILD(state).

    New tuples are built on every call because numpy creates them per pickle
    and CPython memoizes tuples by identity.
    """
    byte_order = {"=": "<" if np.little_endian else ">"}.get(dtype.byteorder, dtype.byteorder)
    if dtype == np.dtype(ml_dtypes.bfloat16) or dtype == np.dtype(ml_dtypes.bfloat16).newbyteorder(">"):
        # A user-defined dtype: numpy passes the scalar type and stores its item size,
        # alignment and flags.
        code = _WRITE_BFLOAT16
        sizes = [dtype.itemsize, dtype.alignment, dtype.flags]
    else:
        code = f"{dtype.kind}{dtype.itemsize}"
        sizes = [-1, -1, dtype.flags]
    return _WriterReduce(
        callable=_WRITE_DTYPE,
        args=tuple([code, False, True]),
        state=tuple([3, byte_order, None, None, None] + sizes),
    )


class ArraySpec:
    """Shape and dtype of an array that is only counted, never written."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)


class PickleGraph:
    """Builds the `_Writer*` object graph of one file, sharing dtype records like numpy does."""

    def __init__(self):
        self.dtype_records: dict[np.dtype, _WriterReduce] = {}

    def array(self, array: Union[np.ndarray, ArraySpec]) -> _WriterReduce:
        """Build the numpy 1.x pickle of an array: `_reconstruct(ndarray, (0,), b'b')` + BUILD(state)."""
        dtype = array.dtype
        if isinstance(array, ArraySpec):
            fortran = False
            payload = _WriterPayload(math.prod(array.shape) * dtype.itemsize, None, "C")
        else:
            # numpy writes Fortran order for arrays that are Fortran- but not C-contiguous.
            fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
            payload = _WriterPayload(array.nbytes, array, "F" if fortran else "C")

        dtype_record = self.dtype_records.get(dtype)
        if dtype_record is None:
            dtype_record = self.dtype_records[dtype] = _dtype_reduction(dtype)

        shape = tuple(int(d) for d in array.shape)
        return _WriterReduce(
            callable=_WRITE_RECONSTRUCT,
            args=tuple([_WRITE_NDARRAY, tuple([0]), b"b"]),
            state=tuple([1, shape, dtype_record, fortran, payload]),
        )

    def quantized(self, weight, scales) -> _WriterReduce:
        """Build the pickle of a QuantizedWeight8bit dataclass: `__new__` + BUILD(instance __dict__)."""
        state = {"weight": self.array(weight), "scales": self.array(scales)}
        return _WriterReduce(callable=_WRITE_QUANTIZED, args=(), state=state, newobj=True)

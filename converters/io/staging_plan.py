"""Where the streaming writer puts each tensor's bytes: a pure function.

The writer (:mod:`staging`) copies every tensor into one of two page-aligned buffers
of ``stage`` bytes and hands a buffer's aligned part to a writer thread.  Which pieces
a tensor is copied in, where each lands, and when a buffer is handed over depend only
on sizes, strides and the buffer geometry; :func:`plan_tensor` decides it, with no I/O
and no torch, and the tests check its promises on random layouts:

- the pieces of a tensor are its elements in row-major order, each once, at
  consecutive positions (so the file is the tensor's bytes, whatever its strides);
- every piece fits the buffer it is placed in;
- every hand-over writes a multiple of ``align`` bytes at a multiple of ``align`` (what
  ``O_DIRECT`` needs), and carries the rest (under ``align`` bytes) to the front of the
  other buffer; the file is the hand-overs in order, then the final remainder.

How pieces are cut:

- a contiguous tensor: flat slices, as much as fits the current buffer;
- a non-contiguous tensor up to ``whole`` bytes: one copy of the whole tensor (torch
  transposes a whole matrix in cache-sized blocks; copies of row slices of a transposed
  matrix are 4-10x slower).  When it does not fit the rest of the buffer, the buffer is
  handed over early and its unaligned tail moves to the next one;
- a larger strided 1-D tensor: chunks of ``piece`` bytes, each made contiguous first;
- a larger tensor of 2 or more dims: blocks of rows of about ``piece`` bytes, each
  copied straight into the buffer where it fits; otherwise a row at a time where a row
  is over ``piece`` bytes, else the block made contiguous first.

A piece is named by the steps that take it from the tensor (:data:`Step`), which the
writer applies to the real tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Union

# One step from a tensor towards a piece of it:
#   ("select", i)    x[i]
#   ("slice", a, b)  x[a:b] (dim 0)
#   ("contiguous",)  x.contiguous() (a copy, for strided data)
#   ("flat", a, b)   x.reshape(-1)[a:b] (x contiguous: a view)
Step = tuple


@dataclass(frozen=True)
class Geometry:
    stage: int  # bytes per staging buffer, a multiple of align
    align: int  # every hand-over is a multiple of this, at a multiple of this
    whole: int  # a non-contiguous tensor up to this size is copied in one go (<= stage - align)
    piece: int  # larger copies go in pieces of about this size

    @classmethod
    def of(cls, stage: int, align: int, whole: int, piece: int) -> "Geometry":
        if stage <= 0 or align <= 0 or stage % align:
            raise ValueError(f"stage {stage} must be a positive multiple of align {align}")
        # A whole copy must fit a buffer after an early hand-over, which may leave up to
        # align - 1 bytes of tail at its front.
        return cls(stage, align, max(0, min(whole, stage - align)), max(1, piece))


@dataclass(frozen=True)
class Spec:
    """What the plan needs of a tensor: its shape, strides (in elements) and item size."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int

    @classmethod
    def contiguous(cls, shape: tuple[int, ...], itemsize: int) -> "Spec":
        return cls(tuple(shape), contiguous_strides(shape), itemsize)


@dataclass(frozen=True)
class Place:
    """Copy the piece ``view`` of the tensor (shape ``shape``) to bytes
    ``[start, start + nbytes)`` of the current buffer."""

    view: tuple[Step, ...]
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class HandOver:
    """Write the current buffer's first ``cut`` bytes at file offset ``offset``, switch
    to the other buffer and copy the ``tail`` bytes after ``cut`` to its front."""

    cut: int
    tail: int
    offset: int


Action = Union[Place, HandOver]


@dataclass(frozen=True)
class Cursor:
    """The writer's state between tensors: bytes laid out in the current buffer, and
    that buffer's file offset."""

    pos: int = 0
    offset: int = 0


def contiguous_strides(shape) -> tuple[int, ...]:
    out, n = [], 1
    for d in reversed(tuple(shape)):
        out.append(n)
        n *= d
    return tuple(reversed(out))


def is_contiguous(shape, strides) -> bool:
    """torch's ``is_contiguous()`` rule: empty tensors are, and dims of size 1 do not
    count."""
    if prod(shape) == 0:
        return True
    want = 1
    for size, stride in zip(reversed(tuple(shape)), reversed(tuple(strides))):
        if size == 1:
            continue
        if stride != want:
            return False
        want *= size
    return True


def plan_tensor(cursor: Cursor, spec: Spec, g: Geometry) -> tuple[list[Action], Cursor]:
    """The actions that append one tensor's bytes, and the cursor after them."""
    p = _Planner(cursor.pos, cursor.offset, g)
    p.write(spec.shape, spec.strides, spec.itemsize, ())
    return p.actions, Cursor(p.pos, p.offset)


def plan_file(specs: list[Spec], g: Geometry) -> tuple[list[Action], Cursor]:
    """All tensors of a file in order (tests; the writer plans one tensor at a time, as
    each is produced).  The final cursor's ``pos`` bytes are written at its ``offset``
    by the writer's finish."""
    actions: list[Action] = []
    cur = Cursor()
    for s in specs:
        more, cur = plan_tensor(cur, s, g)
        actions += more
    return actions, cur


class _Planner:
    def __init__(self, pos: int, offset: int, g: Geometry):
        self.pos, self.offset, self.g = pos, offset, g
        self.actions: list[Action] = []

    def hand_over(self) -> None:
        cut = self.pos - self.pos % self.g.align
        if cut == 0:
            return
        self.actions.append(HandOver(cut, self.pos - cut, self.offset))
        self.offset += cut
        self.pos -= cut

    def place(self, view: tuple, shape: tuple, nbytes: int) -> None:
        self.actions.append(Place(view, tuple(shape), self.pos, nbytes))
        self.pos += nbytes
        if self.pos == self.g.stage:
            self.hand_over()

    def write(self, shape: tuple, strides: tuple, size: int, steps: tuple) -> None:
        g = self.g
        numel = prod(shape)
        if numel == 0:
            return
        if is_contiguous(shape, strides):
            i = 0
            while i < numel:
                k = min(numel - i, (g.stage - self.pos) // size)
                if k == 0:
                    raise ValueError(f"buffer position {self.pos} is not aligned to the item size {size}")
                self.place(steps + (("flat", i, i + k),), (k,), k * size)
                i += k
            return
        nbytes = numel * size
        if nbytes <= g.whole:
            if nbytes > g.stage - self.pos:
                self.hand_over()  # early: the buffer is then nearly empty
            self.place(steps, shape, nbytes)
            return
        if len(shape) == 1:  # strided 1-D: chunks made contiguous
            step = max(1, g.piece // size)
            for i in range(0, shape[0], step):
                j = min(i + step, shape[0])
                self.write((j - i,), (1,), size, steps + (("slice", i, j), ("contiguous",)))
            return
        row = prod(shape[1:]) * size
        step = max(1, g.piece // max(row, 1))
        for i in range(0, shape[0], step):
            j = min(i + step, shape[0])
            block = (j - i,) + tuple(shape[1:])
            if (j - i) * row <= g.stage - self.pos:
                self.place(steps + (("slice", i, j),), block, (j - i) * row)
            elif row > g.piece:
                for r in range(i, j):
                    self.write(tuple(shape[1:]), tuple(strides[1:]), size, steps + (("select", r),))
            else:
                self.write(block, contiguous_strides(block), size, steps + (("slice", i, j), ("contiguous",)))

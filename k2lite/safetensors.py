"""The safetensors container, read through mmap and written tensor by tensor.

A file is: u64 little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data
(offsets count from the end of the header). Reading maps the file and hands out zero-copy
numpy views, so opening a 600 GB checkpoint reads only its headers. BF16 and F8_E4M3 have
no numpy dtype: they come back as uint16 / uint8 holding the raw bits.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from .errors import ModelFormatError

# safetensors dtype -> numpy dtype of the raw storage
DTYPES = {
    "BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "BOOL": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
MAX_HEADER = 100 * 1024 * 1024   # the format's own limit on the JSON header


def _unique_keys(pairs):
    """json object_pairs_hook: a name given twice would silently hide one of the tensors."""
    d = dict(pairs)
    if len(d) != len(pairs):        # rare: find the name for the message
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"key {k!r} appears twice")
            seen.add(k)
    return d


class SafetensorsFile:
    """One .safetensors file: header parsed and checked, data mmap'd, views on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            fd = open(path, "rb")
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: file not found") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot open ({e.strerror})") from None
        with fd:
            size = os.fstat(fd.fileno()).st_size
            if size < 8:
                raise ModelFormatError(f"{path}: truncated (only {size} bytes)")
            (n,) = struct.unpack("<Q", fd.read(8))
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise ModelFormatError(f"{path}: bad header length {n} for a file of {size} bytes")
            raw = fd.read(n)
            try:
                header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
            except (ValueError, RecursionError) as e:    # UnicodeDecodeError, JSONDecodeError, duplicates
                raise ModelFormatError(f"{path}: header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise ModelFormatError(f"{path}: header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict):
                raise ModelFormatError(f"{path}: header '__metadata__' is not a JSON object")
            self.data_start = 8 + n
            data_len = size - self.data_start
            self.entries = {}
            for name, e in header.items():
                self.entries[name] = self._check_entry(name, e, data_len)
            self._check_layout(data_len)
            self._mm = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _check_entry(self, name, e, data_len):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(e, dict):
            raise ModelFormatError(f"{where}: header entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise ModelFormatError(f"{where}: unknown dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise ModelFormatError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ModelFormatError(f"{where}: bad data_offsets {offs!r}")
        b, end = offs
        nbytes = math.prod(shape) * DTYPES[dt].itemsize
        if not (0 <= b <= end <= data_len):
            raise ModelFormatError(f"{where}: data_offsets {offs} outside the file's {data_len} data bytes (truncated?)")
        if end - b != nbytes:
            raise ModelFormatError(f"{where}: {end - b} bytes stored but dtype {dt} shape {shape} needs {nbytes}")
        return dt, tuple(shape), b

    def _check_layout(self, data_len):
        """As the reference reader: the tensors tile the data exactly, in offset order, with no
        overlap (two names reading the same bytes), gap or trailing bytes (data no name owns:
        a header that lost an entry)."""
        end, prev = 0, None
        for name, (dt, shape, b) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[0])):
            if b < end:
                raise ModelFormatError(f"{self.path}: tensor '{name}' (data from byte {b}) overlaps tensor '{prev}'")
            if b > end:
                raise ModelFormatError(f"{self.path}: data bytes {end}..{b} belong to no tensor "
                                       f"(before tensor '{name}'): header and data disagree")
            end, prev = b + math.prod(shape) * DTYPES[dt].itemsize, name
        if end != data_len:
            raise ModelFormatError(f"{self.path}: the last {data_len - end} data bytes belong to no tensor: "
                                   "header and data disagree")

    def __contains__(self, name):
        return name in self.entries

    def keys(self):
        return self.entries.keys()

    def dtype(self, name) -> str:
        return self.entries[name][0]

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def release(self, name):
        """Drop this tensor's pages from our mapping (they stay in the page cache): streaming
        jobs like convert then keep resident memory flat instead of growing with the file."""
        dt, shape, b = self.entries[name]
        start = self.data_start + b
        end = start + math.prod(shape) * DTYPES[dt].itemsize
        start -= start % mmap.PAGESIZE
        if self._mm is not None and end > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, name) -> np.ndarray:
        """A copy of a small tensor read with pread: it is not mapped, so it adds nothing
        to resident memory (the 70k `weight_shape` vectors of K2 Thinking)."""
        if name not in self.entries:
            raise ModelFormatError(f"{self.path}: no tensor named '{name}'")
        dt, shape, b = self.entries[name]
        n = math.prod(shape) * DTYPES[dt].itemsize
        raw = os.pread(self._fd, n, self.data_start + b)
        if len(raw) != n:
            raise ModelFormatError(f"{self.path}: tensor '{name}' is cut short")
        return np.frombuffer(raw, DTYPES[dt]).reshape(shape)

    def load(self, name) -> np.ndarray:
        """The tensor copied into anonymous memory (huge pages where the kernel allows): the
        no-mmap mode. Costs RAM and load time; streams faster than 4 KiB file-backed pages."""
        dt, shape, b = self.entries[name]
        n = math.prod(shape) * DTYPES[dt].itemsize
        if n == 0:
            return np.zeros(shape, DTYPES[dt])
        buf = mmap.mmap(-1, n)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        view, done = memoryview(buf), 0
        while done < n:                      # chunked: pread wants < 2 GiB per call
            got = os.preadv(self._fd, [view[done:done + (1 << 30)]], self.data_start + b + done)
            if got <= 0:
                raise ModelFormatError(f"{self.path}: tensor '{name}' is cut short")
            done += got
        return np.frombuffer(buf, DTYPES[dt]).reshape(shape)

    def get(self, name) -> np.ndarray:
        """Zero-copy, read-only view of a tensor (raw bits for BF16/F8)."""
        if name not in self.entries:
            raise ModelFormatError(f"{self.path}: no tensor named '{name}'")
        dt, shape, b = self.entries[name]
        npdt = DTYPES[dt]
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, npdt)
        off = self.data_start + b
        if off % npdt.itemsize:     # unaligned data: numpy needs a copy for a typed view
            return np.frombuffer(self._mm, np.uint8, count * npdt.itemsize, off).copy().view(npdt).reshape(shape)
        return np.frombuffer(self._mm, npdt, count, off).reshape(shape)


def save_file(tensors: dict, path: str, dtypes: dict | None = None, metadata: dict | None = None):
    """Write {name: array} as safetensors. `dtypes[name]` overrides the stored dtype
    string (e.g. "BF16" for a uint16 array of bf16 bits); otherwise it follows numpy's."""
    dtypes = dtypes or {}
    rev = {"<f4": "F32", "<f2": "F16", "<f8": "F64", "<i8": "I64", "<i4": "I32", "<i2": "I16",
           "|i1": "I8", "|u1": "U8", "<u2": "U16", "<u4": "U32", "|b1": "BOOL"}
    header, offset, arrays = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dt = dtypes.get(name) or rev.get(a.dtype.newbyteorder("<").str if a.dtype.byteorder == ">" else a.dtype.str)
        if dt is None:
            raise ValueError(f"{name}: cannot store numpy dtype {a.dtype}")
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # keep the data 8-byte aligned, as the reference writer does
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)

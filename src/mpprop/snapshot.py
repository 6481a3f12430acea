"""Dated MP snapshot: structures stored once as arrays, plus labels per property.

On disk a snapshot is one `snapshot.npz` (the data) and one `snapshot.json` (metadata).
Arrays, not JSON dicts, because parsing dominates graph building (DESIGN.md §5).

npz keys:
  material_id     (N,)   str
  lattice         (N,3,3) float64, Å
  site_offsets    (N+1,) int64; sites of structure i are [site_offsets[i], site_offsets[i+1])
  atomic_numbers  (S,)   int16
  frac_coords     (S,3)  float64
  labels          (N,P)  float64, raw MP values (before any target transform); NaN = no label
  property_names  (P,)   str
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure

from mpprop.faults import process_alive
from mpprop.graph_cache import gather_ranges
from mpprop.write_errors import writing

SNAPSHOT_DATA = "snapshot.npz"
SNAPSHOT_META = "snapshot.json"
# data files whose SHA-256 this process has checked, by (device, inode, size, mtime): every
# read is verified, but a file is hashed once per process, not once per read
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


class SnapshotError(ValueError):
    """A snapshot that cannot be read or written."""


@dataclass
class Snapshot:
    material_id: np.ndarray
    lattice: np.ndarray
    site_offsets: np.ndarray
    atomic_numbers: np.ndarray
    frac_coords: np.ndarray
    labels: np.ndarray
    property_names: list[str]

    def __len__(self) -> int:
        return len(self.material_id)

    @property
    def n_sites(self) -> np.ndarray:
        return np.diff(self.site_offsets)

    def label(self, prop: str) -> np.ndarray:
        if prop not in self.property_names:
            raise SnapshotError(
                f"property {prop!r} is not in this snapshot (has: {', '.join(self.property_names)})"
            )
        return self.labels[:, self.property_names.index(prop)]

    def structure(self, i: int) -> Structure:
        lo, hi = self.site_offsets[i], self.site_offsets[i + 1]
        return Structure(
            Lattice(self.lattice[i]),
            [int(z) for z in self.atomic_numbers[lo:hi]],
            self.frac_coords[lo:hi],
        )

    @classmethod
    def from_structures(
        cls,
        material_ids: list[str],
        structures: list[Structure],
        labels: np.ndarray,
        property_names: list[str],
    ) -> Snapshot:
        n_sites = np.array([len(s) for s in structures], dtype=np.int64)
        offsets = np.zeros(len(structures) + 1, dtype=np.int64)
        np.cumsum(n_sites, out=offsets[1:])
        if len(structures):
            z = np.concatenate([[sp.Z for sp in s.species] for s in structures]).astype(np.int16)
            frac = np.concatenate([s.frac_coords for s in structures]).astype(np.float64)
            lat = np.stack([s.lattice.matrix for s in structures]).astype(np.float64)
        else:
            z = np.zeros(0, np.int16)
            frac = np.zeros((0, 3))
            lat = np.zeros((0, 3, 3))
        return cls(
            material_id=np.asarray(material_ids, dtype=str),
            lattice=lat,
            site_offsets=offsets,
            atomic_numbers=z,
            frac_coords=frac,
            labels=np.asarray(labels, dtype=np.float64).reshape(len(structures), len(property_names)),
            property_names=list(property_names),
        )

    def subset(self, rows: np.ndarray) -> Snapshot:
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.site_offsets[rows], self.site_offsets[rows + 1]
        site_idx = gather_ranges(starts, ends - starts)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        return Snapshot(
            material_id=self.material_id[rows],
            lattice=self.lattice[rows],
            site_offsets=offsets,
            atomic_numbers=self.atomic_numbers[site_idx],
            frac_coords=self.frac_coords[site_idx],
            labels=self.labels[rows],
            property_names=list(self.property_names),
        )


def structure_problem(structure: Structure) -> str | None:
    """Why a parsed structure cannot be used (a reason key), or None if it can.

    One check for every way structures come in: snapshot records and prediction inputs.
    """
    from pymatgen.core.periodic_table import DummySpecies

    if len(structure) == 0:
        return "no_sites"
    if not structure.is_ordered:
        return "disordered_sites"
    if any(isinstance(sp, DummySpecies) for sp in structure.species):
        return "unsupported_species"
    m = structure.lattice.matrix
    if not (np.isfinite(m).all() and np.isfinite(structure.frac_coords).all()):
        return "invalid_geometry"
    if not abs(np.linalg.det(m)) > 1e-6:
        return "invalid_geometry"
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_file_mode() -> int:
    """The mode a newly created file gets under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file_prefix(path: Path, pid: int | None = None) -> str:
    """`.<name>.tmp-<host>-<pid>-`: a temp file of `path` by process `pid` of this host (with
    pid None: the prefix of all of this host's)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f".{path.name}.tmp-{host}-" + ("" if pid is None else f"{pid}-")


def _remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files of `path` that writers on this host left when they were killed
    (their pid no longer runs); other hosts' temp files (a shared folder) are left alone."""
    prefix = _temp_file_prefix(path)
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[str]:
    """A temp file beside `path` to write to: renamed over `path` when the block ends, removed
    if it fails, so readers never see a half file. The temp name is unique (several workers
    may write the same file at once) and names the writer's host and pid, so the temp files of
    killed writers are removed by the next one; it gets the mode of a new file, since mkstemp's
    0600 would outlive the rename."""
    path = Path(path)
    # a read-only folder, a full disk: one error naming `path`, not the temp name
    with writing(path, permission=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_file_prefix(path, os.getpid()), dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            yield tmp
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_snapshot(snapshot: Snapshot, out_dir: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write snapshot.npz and snapshot.json as one unit (outputs.output_dir): a temp folder
    beside `out_dir`, swapped in whole, so a kill at any moment leaves the previous snapshot
    intact, and a second fetch into the same folder fails instead of mixing files."""
    from mpprop.outputs import output_dir

    with output_dir(out_dir, "fetch") as tmp:
        data_path = tmp / SNAPSHOT_DATA
        # errors name the files as the user knows them, not the temp folder
        with writing(Path(out_dir) / SNAPSHOT_DATA), open(data_path, "wb") as fh:
            np.savez(
                fh,
                material_id=snapshot.material_id,
                lattice=snapshot.lattice,
                site_offsets=snapshot.site_offsets,
                atomic_numbers=snapshot.atomic_numbers,
                frac_coords=snapshot.frac_coords,
                labels=snapshot.labels,
                property_names=np.asarray(snapshot.property_names, dtype=str),
            )
        meta = dict(metadata)
        meta["data_file"] = SNAPSHOT_DATA
        meta["sha256"] = sha256_file(data_path)
        meta["n_records"] = len(snapshot)
        with writing(Path(out_dir) / SNAPSHOT_META):
            (tmp / SNAPSHOT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _missing_metadata(meta_path: Path) -> SnapshotError:
    return SnapshotError(
        f"no snapshot metadata at {meta_path}: the snapshot is missing or incomplete; "
        "run `mpprop fetch`"
    )


def load_metadata(snapshot_dir: str | Path) -> dict[str, Any]:
    from mpprop.outputs import readable_dir

    meta_path = readable_dir(snapshot_dir) / SNAPSHOT_META
    if not meta_path.exists():
        raise _missing_metadata(Path(snapshot_dir) / SNAPSHOT_META)
    return json.loads(meta_path.read_text())


def load_snapshot(snapshot_dir: str | Path, verify: bool = True) -> tuple[Snapshot, dict[str, Any]]:
    """Load a snapshot folder; with verify (the default) the data must match the SHA-256 in its
    metadata (a truncated or changed snapshot.npz is a SnapshotError naming it, not a
    traceback or silently different data); each file is hashed once per process.

    Both files are read through one handle on the folder, so a `mpprop fetch` swapping in a
    new snapshot meanwhile cannot pair this metadata with that data; if the swap removed the
    old files before they were opened, the new snapshot is read instead.
    """
    from mpprop.outputs import readable_dir

    for attempt in range(3):
        folder = readable_dir(snapshot_dir)
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise _missing_metadata(Path(snapshot_dir) / SNAPSHOT_META) from None
        try:
            return _load_snapshot_at(dir_fd, folder, verify)
        except FileNotFoundError:
            if attempt == 2:
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


_REFETCH = "fetch it again (`mpprop fetch`, or `dvc checkout` of the snapshot folder)"


def _verify_data(fh: Any, path: Path, expected: str | None) -> None:
    """SnapshotError unless the open data file `fh` has the SHA-256 `expected` (from the
    metadata); a file already checked by this process (same inode, size, mtime) is not
    hashed again."""
    if not expected:
        raise SnapshotError(f"{path.with_name(SNAPSHOT_META)} records no SHA-256 of {path.name}: "
                            f"it cannot be checked; {_REFETCH}")
    st = os.fstat(fh.fileno())
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) == expected:
        return
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    fh.seek(0)
    if h.hexdigest() != expected:
        raise SnapshotError(
            f"{path} does not match the SHA-256 recorded in {SNAPSHOT_META} (truncated or "
            f"changed since `mpprop fetch` wrote it); {_REFETCH}")
    _VERIFIED[key] = expected


def _load_snapshot_at(dir_fd: int, folder: Path, verify: bool) -> tuple[Snapshot, dict[str, Any]]:
    def opener(name: str, flags: int) -> int:
        return os.open(name, flags, dir_fd=dir_fd)

    try:
        with open(SNAPSHOT_META, encoding="utf-8", opener=opener) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        if os.path.exists(folder / SNAPSHOT_META):
            raise  # swapped meanwhile: read again
        raise _missing_metadata(folder / SNAPSHOT_META) from None
    data_name = meta.get("data_file", SNAPSHOT_DATA)
    path = folder / data_name
    with open(data_name, "rb", opener=opener) as fh:
        if verify:
            _verify_data(fh, path, meta.get("sha256"))
        try:
            with np.load(fh, allow_pickle=False) as npz:
                snap = Snapshot(
                    material_id=npz["material_id"],
                    lattice=npz["lattice"],
                    site_offsets=npz["site_offsets"],
                    atomic_numbers=npz["atomic_numbers"],
                    frac_coords=npz["frac_coords"],
                    labels=npz["labels"],
                    property_names=[str(p) for p in npz["property_names"]],
                )
        except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as exc:
            raise SnapshotError(f"{path} cannot be read ({type(exc).__name__}: {exc}); "
                                f"{_REFETCH}") from exc
    return snap, meta

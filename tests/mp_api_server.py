"""A loopback HTTP server that answers the real `mp_api` client like the MP API does.

It implements the part of the Materials Project REST API (v3) that `mpprop fetch` and the
`mp_api.client.MPRester` constructor use, with the same URLs, query parameters and JSON
envelope as the client expects (read from mp_api 0.46.5, `client/core/client.py`):

- `GET /heartbeat` -> `{"status", "version" (emmet), "db_version", "access_controlled_batch_ids"}`;
  the client calls it without the API key on construction (emmet version check, db version).
- `GET /materials/summary/` and `GET /materials/thermo/` -> `{"data": [...], "errors": [],
  "meta": {"total_doc", "max_limit", ...}}`, paginated with `_limit`/`_skip` (or
  `_page`/`_per_page`), projected with `_fields` (comma list) or `_all_fields=True`;
  without either only `material_id` and `last_updated` come back, as on MP.
- Filters: `material_ids` (comma list), and on thermo `thermo_types`/`thermo_ids`;
  on summary `elements`, `exclude_elements`, `chemsys`, `formula`, `deprecated`,
  `<field>_min`/`<field>_max` for the numeric fields (`k_vrh`, `g_vrh` for the moduli).
  Any other filter gets HTTP 400, so a test cannot pass because a filter was ignored.
- The data endpoints require an `x-api-key` header of 32 characters (HTTP 401 otherwise).
- URLs longer than `max_url_length` get HTTP 414, as from MP's gateway; the client then
  splits comma-separated lists into batches (its `_submit_requests`).
- `busy={path: n}`: the first n requests to that path (e.g. "/materials/summary/",
  "/heartbeat") get HTTP 503 Service Unavailable, as from a busy or restarting gateway.

Documents are built from records with MP summary field names (the shared snapshot's format).
To model the functional trap of current MP summary documents (DESIGN.md §4), the summary
`energy_per_atom` is shifted by `summary_energy_shift` (default -10 eV/atom, the size of an
r2SCAN total-energy offset), while `materials/thermo` serves the record's value as the
`GGA_GGA+U` document and the shifted one as the `R2SCAN` document. A fetch that reads the
summary field, or forgets `thermo_types`, therefore gets different numbers.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SHARED_SNAPSHOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_snapshot.jsonl.gz"
GGA = "GGA_GGA+U"
R2SCAN = "R2SCAN"
MAX_LIMIT = 1000  # MP's page-size cap

# numeric range filters of materials/summary: query name -> dotted document field
SUMMARY_RANGES = {
    "formation_energy_per_atom": "formation_energy_per_atom",
    "energy_per_atom": "energy_per_atom",
    "efermi": "efermi",
    "band_gap": "band_gap",
    "homogeneous_poisson": "homogeneous_poisson",
    "k_vrh": "bulk_modulus.vrh",
    "g_vrh": "shear_modulus.vrh",
    "nsites": "nsites",
    "nelements": "nelements",
}
THERMO_RANGES = {
    "energy_per_atom": "energy_per_atom",
    "formation_energy_per_atom": "formation_energy_per_atom",
    "nelements": "nelements",
}
# accepted and deliberately without effect: the served data has no GNoME documents
IGNORED = {"batch_id_not_eq"}


def load_records(
    path: Path = SHARED_SNAPSHOT, limit: int | None = None, ids: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (the first `limit` lines, or those with the given ids)."""
    wanted = set(ids) if ids is not None else None
    out = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in itertools.islice(fh, limit):
            rec = json.loads(line)
            if wanted is None or rec["material_id"] in wanted:
                out.append(rec)
    return out


def _emmet_version() -> str:
    try:
        return version("emmet-core")
    except PackageNotFoundError:  # pragma: no cover
        return "0.87.3"


def _dotted(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _elements(structure: Any) -> list[str]:
    """Element symbols of a Structure.as_dict(), without parsing it (records may be broken)."""
    els: set[str] = set()
    try:
        for site in structure["sites"]:
            for sp in site["species"]:
                els.add("".join(c for c in sp["element"] if c.isalpha()))
    except (TypeError, KeyError):
        pass
    return sorted(els)


def summary_doc(rec: dict[str, Any], energy_shift: float) -> dict[str, Any]:
    structure = rec.get("structure")
    els = _elements(structure)
    energy = rec.get("energy_per_atom")
    sites = structure.get("sites") if isinstance(structure, dict) else None
    return {
        "material_id": rec.get("material_id"),
        "formula_pretty": rec.get("formula_pretty"),
        "structure": structure,
        "nsites": len(sites) if isinstance(sites, list) else None,
        "elements": els,
        "nelements": len(els),
        "chemsys": "-".join(els),
        "deprecated": False,
        "formation_energy_per_atom": rec.get("formation_energy_per_atom"),
        # what a mixed GGA/r2SCAN summary would carry for this material
        "energy_per_atom": None if energy is None else energy + energy_shift,
        "efermi": rec.get("efermi"),
        "band_gap": rec.get("band_gap"),
        "bulk_modulus": rec.get("bulk_modulus"),
        "shear_modulus": rec.get("shear_modulus"),
        "homogeneous_poisson": rec.get("homogeneous_poisson"),
        "last_updated": "2024-05-01T00:00:00",
    }


def thermo_docs(rec: dict[str, Any], energy_shift: float) -> list[dict[str, Any]]:
    energy = rec.get("energy_per_atom")
    if energy is None:
        return []
    els = _elements(rec.get("structure"))
    common = {
        "material_id": rec["material_id"],
        "formula_pretty": rec.get("formula_pretty"),
        "elements": els,
        "nelements": len(els),
        "chemsys": "-".join(els),
        "last_updated": "2024-05-01T00:00:00",
    }
    return [
        common
        | {
            "thermo_id": f"{rec['material_id']}_{GGA}",
            "thermo_type": GGA,
            "energy_per_atom": energy,
            "formation_energy_per_atom": rec.get("formation_energy_per_atom"),
        },
        common
        | {
            "thermo_id": f"{rec['material_id']}_{R2SCAN}",
            "thermo_type": R2SCAN,
            "energy_per_atom": energy + energy_shift,
            "formation_energy_per_atom": None,
        },
    ]


class _BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _as_bool(value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise _BadRequest(400, f"not a boolean: {value!r}")


def _as_float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as err:
        raise _BadRequest(400, f"{name}: not a number: {value!r}") from err


def _in_range(value: Any, lo: float | None, hi: float | None) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


class MPAPIServer:
    """The loopback MP API; use as a context manager, point MP_API_ENDPOINT at `.endpoint`."""

    def __init__(
        self,
        records: list[dict[str, Any]] | None = None,
        db_version: str = "2020_09_08",
        summary_energy_shift: float = -10.0,
        max_url_length: int = 8190,
        busy: dict[str, int] | None = None,
    ) -> None:
        if records is None:
            records = load_records(limit=500)
        self.db_version = db_version
        self.max_url_length = max_url_length
        self.busy = dict(busy or {})  # path -> 503 answers still to give
        self.statuses: list[tuple[str, int]] = []  # (path, status) as answered
        self.summary = [summary_doc(r, summary_energy_shift) for r in records]
        self.thermo = [d for r in records for d in thermo_docs(r, summary_energy_shift)]
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, params) as received
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> MPAPIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MPAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling
    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        with self._lock:
            self.statuses.append((urlsplit(h.path).path, status))
        payload = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with self._lock:
            self.requests.append((url.path, params))
            busy = self.busy.get(url.path, 0) > 0
            if busy:
                self.busy[url.path] -= 1
        if busy:
            self._reply(h, 503, {"detail": "Service Unavailable"})
            return
        try:
            if len(h.path) > self.max_url_length:
                raise _BadRequest(414, "Request-URI Too Long")
            if url.path == "/heartbeat":
                body = {
                    "status": "OK",
                    "version": _emmet_version(),
                    "db_version": self.db_version,
                    "access_controlled_batch_ids": [],
                }
                self._reply(h, 200, body)
                return
            key = h.headers.get("x-api-key") or ""
            if len(key) != 32:
                raise _BadRequest(401, "Invalid or missing API key")
            if url.path in ("/materials/summary", "/materials/summary/"):
                docs = self._filter(self.summary, params, SUMMARY_RANGES, thermo=False)
            elif url.path in ("/materials/thermo", "/materials/thermo/"):
                docs = self._filter(self.thermo, params, THERMO_RANGES, thermo=True)
            else:
                raise _BadRequest(404, "Not Found")
            self._reply(h, 200, self._page(docs, params))
        except _BadRequest as err:
            self._reply(h, err.status, {"detail": err.detail})

    def _filter(
        self,
        docs: list[dict[str, Any]],
        params: dict[str, str],
        ranges: dict[str, str],
        thermo: bool,
    ) -> list[dict[str, Any]]:
        out = docs
        bounds: dict[str, list[float | None]] = {}
        for name, value in params.items():
            if name.startswith("_") or name in IGNORED:
                continue
            if name == "material_ids":
                ids = set(value.split(","))
                out = [d for d in out if d["material_id"] in ids]
            elif thermo and name == "thermo_types":
                types = set(value.split(","))
                out = [d for d in out if d["thermo_type"] in types]
            elif thermo and name == "thermo_ids":
                tids = set(value.split(","))
                out = [d for d in out if d["thermo_id"] in tids]
            elif name == "elements":
                want = set(value.split(","))
                out = [d for d in out if want <= set(d["elements"])]
            elif name == "exclude_elements":
                drop = set(value.split(","))
                out = [d for d in out if not drop & set(d["elements"])]
            elif name == "chemsys":
                systems = {"-".join(sorted(c.split("-"))) for c in value.split(",")}
                out = [d for d in out if d["chemsys"] in systems]
            elif name == "formula":
                formulas = set(value.split(","))
                out = [d for d in out if d.get("formula_pretty") in formulas]
            elif not thermo and name == "deprecated":
                flag = _as_bool(value)
                out = [d for d in out if d["deprecated"] == flag]
            elif name.endswith(("_min", "_max")) and name[:-4] in ranges:
                b = bounds.setdefault(name[:-4], [None, None])
                b[0 if name.endswith("_min") else 1] = _as_float(name, value)
            else:
                raise _BadRequest(400, f"query parameter {name!r} is not supported here")
        for field, (lo, hi) in bounds.items():
            out = [d for d in out if _in_range(_dotted(d, ranges[field]), lo, hi)]
        return out

    def _page(self, docs: list[dict[str, Any]], params: dict[str, str]) -> dict[str, Any]:
        try:
            if "_page" in params:
                per_page = int(params.get("_per_page") or params.get("_limit") or 100)
                skip = (int(params["_page"]) - 1) * per_page
                limit = per_page
            else:
                skip = int(params.get("_skip", 0))
                limit = int(params.get("_limit", 100))
        except ValueError as err:
            raise _BadRequest(400, f"bad pagination parameter: {err}") from err
        if limit > MAX_LIMIT or limit < 0 or skip < 0:
            raise _BadRequest(400, f"_limit must be within 0..{MAX_LIMIT}, _skip >= 0")
        if _as_bool(params.get("_all_fields", "false")):
            fields = None
        elif params.get("_fields"):
            fields = params["_fields"].split(",")
        else:
            fields = ["material_id", "last_updated"]
        page = docs[skip : skip + limit]
        if fields is not None:
            page = [{f: d[f] for f in fields if f in d} for d in page]
        return {
            "data": page,
            "errors": [],
            "meta": {
                "api_version": _emmet_version(),
                "time_stamp": datetime.now(UTC).isoformat(),
                "total_doc": len(docs),
                "max_limit": MAX_LIMIT,
                "facet": {},
            },
        }

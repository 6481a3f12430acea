"""The Materials Project API source of `mpprop fetch`, through the real `mp_api` client.

The "final energy" target comes from thermo documents of one functional, never from the
summary `energy_per_atom`, which mixes GGA/GGA+U and r2SCAN energies (DESIGN.md §4). Busy
answers (503 included) are retried with backoff; what is printed or raised never shows the
API key.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any
from urllib.parse import urlsplit

from mpprop.config import Params
from mpprop.settings import PropertySpec
from mpprop.sources import ENERGY_FIELD, Candidate, FetchError, dotted

# search() arguments that fetch sets itself; criteria must not override them
RESERVED_CRITERIA = {"fields", "all_fields", "num_chunks", "chunk_size"}
# HTTP answers worth retrying: the client's own list (429, 502, 504) plus 503, which MP's
# gateway gives while it is overloaded or restarting; urllib3 sleeps
# backoff * 2**(retry - 1) between tries (none before the first), or what Retry-After says
MP_API_RETRY_STATUSES = (429, 502, 503, 504)
MP_API_MAX_RETRIES = 4
MP_API_BACKOFF_FACTOR = 0.5  # seconds; tests make it small
# an `x-api-key` header as an error body may echo it (a proxy or a server that reflects the
# request): `x-api-key: VALUE`, `'x-api-key': 'VALUE'`, `"X-API-KEY":"VALUE"`
_API_KEY_HEADER = re.compile(r"""(x-api-key['"]?\s*[:=]\s*['"]?)[^'"\s,;}]+""", re.IGNORECASE)
MASK = "***"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _mp_api_retry(connect: bool = True) -> Any:
    """urllib3 Retry as mp_api's own session has (MPRester._create_session), plus 503."""
    from urllib3.util.retry import Retry

    n = MP_API_MAX_RETRIES
    return Retry(
        total=n,
        connect=n if connect else 0,
        read=n if connect else 0,
        status=n,
        respect_retry_after_header=True,
        status_forcelist=MP_API_RETRY_STATUSES,
        backoff_factor=MP_API_BACKOFF_FACTOR,
    )


def _retry_busy_answers(session: Any) -> None:
    """Make a requests session retry MP_API_RETRY_STATUSES, with backoff.

    mp_api's session retries 429/502/504 only, so one 503 from a busy gateway ended a fetch.
    """
    from requests.adapters import HTTPAdapter

    adapter = HTTPAdapter(max_retries=_mp_api_retry())
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def _probe_heartbeat(endpoint: str | None) -> None:
    """GET <endpoint>/heartbeat until it is not a busy answer (MP_API_RETRY_STATUSES).

    MPRester's constructor reads the heartbeat with a plain requests.get, without retries, and
    a 503 there ends in a KeyError; once this probe has had an answer, that read is likely
    to get one too. Connection errors are not retried here (they are not a busy server).
    """
    import requests
    from mp_api.client.core.utils import validate_endpoint
    from requests.adapters import HTTPAdapter

    with requests.Session() as session:
        adapter = HTTPAdapter(max_retries=_mp_api_retry(connect=False))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.get(validate_endpoint(endpoint) + "heartbeat", timeout=60).close()


def mask_api_key(text: str, api_key: str | None) -> str:
    """`text` with the MP API key, and any `x-api-key` header value, replaced by ***: what
    fetch prints or raises never shows the key (an MP error body is quoted verbatim)."""
    if api_key:
        text = text.replace(api_key, MASK)
    return _API_KEY_HEADER.sub(lambda m: m.group(1) + MASK, text)


def warn_if_insecure(endpoint: str | None) -> None:
    """One line on stderr where MP_API_ENDPOINT is not https and not this machine: the key
    travels in a request header, readable on the way."""
    if not endpoint:
        return
    url = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if url.scheme != "https" and (url.hostname or "") not in LOCAL_HOSTS:
        print(f"warning: MP_API_ENDPOINT {mask_api_key(endpoint, None)} is not https: the "
              "MP API key is sent unencrypted", file=sys.stderr)


def _query_mp_api(
    api_key: str,
    endpoint: str | None,
    criteria: dict[str, Any],
    fields: list[str],
    chunk: int,
    thermo_type: str | None,
    progress: bool,
) -> tuple[str | None, str, list[dict[str, Any]], dict[str, Any], int]:
    """Summary docs, and energies of one thermo type (if asked), via the real MPRester."""
    from mp_api.client import MPRester

    # a finite num_chunks keeps the client on the REST path even if the criteria reduce to
    # no query parameter (it would otherwise switch to S3); the limit is never reached
    no_s3 = 10**9
    energies: dict[str, Any] = {}
    n_thermo = 0
    _probe_heartbeat(endpoint)
    try:
        mpr = MPRester(
            api_key=api_key,
            endpoint=endpoint,
            use_document_model=False,  # raw dicts: validation and counting are ours
            mute_progress_bars=not progress,
        )
    except KeyError as err:  # a heartbeat answer without version / db_version
        raise FetchError(f"unexpected MP API heartbeat answer: no {err} in it") from err
    _retry_busy_answers(mpr.session)  # shared by all its sub-resters
    with mpr:
        # db_version comes from GET <endpoint>/heartbeat on construction
        # (get_database_version() is a deprecated alias of this attribute)
        db_version = mpr.db_version or None
        used_endpoint = mpr.endpoint
        docs = mpr.materials.summary.search(
            **criteria, fields=fields, chunk_size=chunk, num_chunks=no_s3
        )
        ids = list(dict.fromkeys(str(d["material_id"]) for d in docs if d.get("material_id")))
        for start in range(0, len(ids), chunk) if thermo_type else ():
            tdocs = mpr.materials.thermo.search(
                material_ids=ids[start : start + chunk],
                thermo_types=[thermo_type],
                fields=["material_id", "energy_per_atom", "thermo_type"],
                chunk_size=chunk,
                num_chunks=no_s3,
            )
            for t in tdocs:
                n_thermo += 1
                ttype = str(getattr(t.get("thermo_type"), "value", t.get("thermo_type")))
                if ttype != thermo_type:
                    raise FetchError(
                        f"the API returned a {ttype} thermo document for {t.get('material_id')}"
                        f" although {thermo_type} was requested; refusing to mix functionals"
                    )
                mid = str(t["material_id"])
                if mid in energies and energies[mid] != t.get("energy_per_atom"):
                    raise FetchError(f"two different {thermo_type} energies for {mid}")
                energies[mid] = t.get("energy_per_atom")
    return db_version, used_endpoint, docs, energies, n_thermo


def _query_masked(api_key: str, endpoint: str | None, *args: Any
                  ) -> tuple[str | None, str, list[dict[str, Any]], dict[str, Any], int]:
    """_query_mp_api, any of its errors a FetchError in one line with the key masked."""
    # imported here: the client takes seconds to import and only this path needs it
    from mp_api.client.core.exceptions import MPRestError
    from requests.exceptions import RequestException

    try:
        return _query_mp_api(api_key, endpoint, *args)
    except Exception as err:  # noqa: BLE001 - any error of the client: one masked message
        where = endpoint or "the default MP endpoint"
        text = (str(err) if isinstance(err, FetchError) else
                f"MP API query failed ({where}): {err}" if isinstance(
                    err, MPRestError | RequestException) else
                f"MP API query failed ({where}): {type(err).__name__}: {err}")
        # one line (mp_api puts the server's answer on a line of its own); `from None`: a
        # traceback of the cause would show the unmasked text again
        raise FetchError(mask_api_key(" ".join(text.split()), api_key)) from None


def _checked_criteria(criteria: dict[str, Any]) -> dict[str, Any]:
    """data.mp_api.criteria, refused where empty or where it sets what fetch sets."""
    if not any(not str(k).startswith("_") and v is not None for k, v in criteria.items()):
        raise FetchError(
            "data.mp_api.criteria is empty. Without search criteria the mp_api client does "
            "not query the REST API but downloads the whole collection from MP's S3 object "
            "store (delta tables), which this machine cannot reach and which bypasses the "
            "query recorded in the snapshot metadata. Give criteria accepted by "
            "MPRester().materials.summary.search, e.g. "
            "criteria: {material_ids: [mp-149, mp-13]} or {elements: [Si], num_elements: [1, 2]}."
        )
    if bad := RESERVED_CRITERIA & set(criteria):
        raise FetchError(f"data.mp_api.criteria must not set {sorted(bad)}: fetch sets them")
    return criteria


def mp_api_candidates(
    params: Params, specs: dict[str, PropertySpec], props: list[str], progress: bool
) -> tuple[list[Candidate], dict[str, Any]]:
    """The records of the query in params `data.mp_api` as candidates, and the query's
    metadata (endpoint, database version, criteria, energy functional, document counts)."""
    mp = params.data.mp_api
    criteria = _checked_criteria(dict(mp.criteria))
    api_key = os.environ.get("MP_API_KEY")
    if not api_key:
        raise FetchError("source mp-api needs an API key in the environment variable MP_API_KEY")
    # mp_api reads MP_API_ENDPOINT once, when its settings module is first imported; passing
    # it explicitly makes a value set later (tests, notebooks) count as well
    endpoint = os.environ.get("MP_API_ENDPOINT") or None
    warn_if_insecure(endpoint)
    chunk = mp.chunk_size
    thermo_type = mp.energy_thermo_type
    energy_props = [p for p in props if specs[p].field == ENERGY_FIELD]
    # summary fields: top-level names; energy_per_atom is not asked for (see module doc)
    fields = ["material_id", "structure"]
    for p in props:
        top = specs[p].field.split(".", 1)[0]
        if specs[p].field != ENERGY_FIELD and top not in fields:
            fields.append(top)
    db_version, used_endpoint, docs, energies, n_thermo = _query_masked(
        api_key, endpoint, criteria, fields, chunk, thermo_type if energy_props else None,
        progress,
    )
    cands = []
    for i, d in enumerate(docs):
        values = {p: dotted(d, specs[p].field) for p in props if p not in energy_props}
        mid = d.get("material_id")
        for p in energy_props:
            values[p] = energies.get(str(mid)) if mid is not None else None
        cands.append(Candidate(i, mid, d.get("structure"), values))
    info = {
        "endpoint": used_endpoint,
        "database_version": db_version,
        "query": {
            "criteria": criteria,
            "summary_fields": fields,
            "energy_thermo_types": [thermo_type] if energy_props else [],
        },
        "energy_per_atom_functional": (
            f"{thermo_type} (MP materials/thermo documents of this type; the summary "
            "energy_per_atom, which mixes functionals, is not used)"
            if energy_props
            else None
        ),
        "mp_api": {
            "n_summary_docs": len(docs),
            "n_thermo_docs": n_thermo,
            "n_with_thermo_energy": sum(1 for v in energies.values() if v is not None),
            "chunk_size": chunk,
        },
    }
    return cands, info


"""NSE's UDiFF common bhavcopy: the two zipped end-of-day files of a trading day.

Since 8 July 2024 NSE publishes, per segment, ``BhavCopy_NSE_<SEG>_0_0_0_YYYYMMDD_F_0000.csv.zip``
(``CM`` cash, ``FO`` equity derivatives): a zip holding one CSV with the 34 columns of
:data:`COLUMNS`. What the columns mean, as Nadi reads them:

- ``TradDt``/``BizDt`` trade and business date (ISO); ``Sgmt`` ``CM``/``FO``; ``Src`` ``NSE``;
- ``FinInstrmTp`` ``STK`` (cash), ``IDF``/``IDO``/``STF``/``STO`` (index/stock future/option);
- ``FinInstrmId``: the exchange's token of the instrument, unique per segment and day. This is
  the key: one ISIN can be on several rows (an ``EQ`` and a ``BL`` block-deal row, each with its
  own token), and F&O rows have no ISIN at all;
- ``TckrSymb`` symbol (the underlying for F&O), ``SctySrs`` series (cash only), ``XpryDt``,
  ``StrkPric``, ``OptnTp`` (F&O only), ``FinInstrmNm`` the company name (cash) or the contract;
- prices in rupees: ``OpnPric``, ``HghPric``, ``LwPric``, ``ClsPric`` (the VWAP of the last half
  hour), ``LastPric``, ``PrvsClsgPric``, ``UndrlygPric``, ``SttlmPric`` (the settlement price);
- ``OpnIntrst``/``ChngInOpnIntrst`` in shares; ``TtlTradgVol`` in shares for cash but in
  *contracts* (lots) for F&O, hence :attr:`BhavcopyRow.volume_shares`; ``TtlTrfVal`` rupees;
  ``TtlNbOfTxsExctd`` trades; ``SsnId``; ``NewBrdLotQty`` the lot size; ``Rmks``, ``Rsvd1-4``.

:func:`parse_bhavcopy` refuses (:class:`BhavcopyError`) anything else: another header, a row of
another day or segment, a duplicate ``FinInstrmId``, a number that is not one. The same module
writes the files (:func:`encode_bhavcopy`, the simulator's) and finds them (:func:`load_bhavcopy`:
a folder, then a URL template).
"""

from __future__ import annotations

import io
import zipfile
from datetime import date
from pathlib import Path
from typing import Literal, get_args

import httpx
import msgspec
import polars as pl

Segment = Literal["CM", "FO"]
SEGMENTS: tuple[Segment, ...] = get_args(Segment)

COLUMNS = (
    "TradDt", "BizDt", "Sgmt", "Src", "FinInstrmTp", "FinInstrmId", "ISIN", "TckrSymb",
    "SctySrs", "XpryDt", "FininstrmActlXpryDt", "StrkPric", "OptnTp", "FinInstrmNm", "OpnPric",
    "HghPric", "LwPric", "ClsPric", "LastPric", "PrvsClsgPric", "UndrlygPric", "SttlmPric",
    "OpnIntrst", "ChngInOpnIntrst", "TtlTradgVol", "TtlTrfVal", "TtlNbOfTxsExctd", "SsnId",
    "NewBrdLotQty", "Rmks", "Rsvd1", "Rsvd2", "Rsvd3", "Rsvd4",
)  # fmt: skip

# The typed schema of a parsed file. Columns absent here are text.
_DATES = ("TradDt", "BizDt", "XpryDt", "FininstrmActlXpryDt")
_FLOATS = ("StrkPric", "OpnPric", "HghPric", "LwPric", "ClsPric", "LastPric", "PrvsClsgPric",
           "UndrlygPric", "SttlmPric", "TtlTrfVal")  # fmt: skip
_INTS = ("FinInstrmId", "OpnIntrst", "ChngInOpnIntrst", "TtlTradgVol", "TtlNbOfTxsExctd",
         "NewBrdLotQty")  # fmt: skip
_REQUIRED = ("TradDt", "Sgmt", "FinInstrmId", "FinInstrmNm", "OpnPric", "HghPric", "LwPric",
             "ClsPric", "TtlTradgVol")  # fmt: skip
SCHEMA: dict[str, type[pl.DataType]] = {
    c: pl.Date if c in _DATES else pl.Float64 if c in _FLOATS else pl.Int64 if c in _INTS
    else pl.Utf8
    for c in COLUMNS
}  # fmt: skip


class BhavcopyError(ValueError):
    """A file that is not the UDiFF bhavcopy it should be (the message says why)."""


class BhavcopyRow(msgspec.Struct, frozen=True):
    """One row of a UDiFF bhavcopy; field names are NSE's column names in snake case."""

    trad_dt: date
    biz_dt: date | None
    sgmt: Segment
    src: str
    fin_instrm_tp: str
    fin_instrm_id: int
    isin: str | None
    tckr_symb: str | None
    scty_srs: str | None
    xpry_dt: date | None
    fininstrm_actl_xpry_dt: date | None
    strk_pric: float | None
    optn_tp: str | None
    fin_instrm_nm: str
    opn_pric: float
    hgh_pric: float
    lw_pric: float
    cls_pric: float
    last_pric: float | None
    prvs_clsg_pric: float | None
    undrlyg_pric: float | None
    sttlm_pric: float | None
    opn_intrst: int | None
    chng_in_opn_intrst: int | None
    ttl_tradg_vol: int
    ttl_trf_val: float | None
    ttl_nb_of_txs_exctd: int | None
    ssn_id: str | None
    new_brd_lot_qty: int | None
    rmks: str | None = None
    rsvd1: str | None = None
    rsvd2: str | None = None
    rsvd3: str | None = None
    rsvd4: str | None = None

    @property
    def volume_shares(self) -> int:
        """Traded quantity in shares: F&O files count contracts, so times the lot size."""
        if self.sgmt == "FO":
            return self.ttl_tradg_vol * (self.new_brd_lot_qty or 1)
        return self.ttl_tradg_vol


_FIELDS = BhavcopyRow.__struct_fields__
assert len(_FIELDS) == len(COLUMNS)  # one field per column, in order


def bhavcopy_filename(segment: Segment, day: date) -> str:
    """NSE's name of the day's zipped file of ``segment``."""
    return f"BhavCopy_NSE_{segment}_0_0_0_{day:%Y%m%d}_F_0000.csv.zip"


def _csv_text(data: bytes, name: str) -> str:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BhavcopyError(f"{name}: not a zip file (NSE publishes the bhavcopy zipped)") from None
    with zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        if len(members) != 1 or not members[0].filename.lower().endswith(".csv"):
            raise BhavcopyError(
                f"{name}: the zip must hold one CSV, it holds {[m.filename for m in members]}"
            )
        return zf.read(members[0]).decode("utf-8-sig")


def parse_bhavcopy(
    data: bytes, segment: Segment, day: date, *, name: str = ""
) -> list[BhavcopyRow]:
    """The rows of a zipped UDiFF bhavcopy of ``segment`` on ``day``, or BhavcopyError."""
    name = name or bhavcopy_filename(segment, day)
    text = _csv_text(data, name)
    header = tuple(h.strip() for h in text.split("\n", 1)[0].rstrip("\r").split(","))
    if header != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        why = (f"missing {missing}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {extra}" if extra else ""
        )
        raise BhavcopyError(
            f"{name}: header is not NSE's 34-column UDiFF bhavcopy header "
            f"({why or 'columns out of order'}; got {len(header)} columns)"
        )
    try:
        raw = pl.read_csv(
            io.StringIO(text), schema=dict.fromkeys(COLUMNS, pl.Utf8), has_header=True,
        )  # fmt: skip
    except pl.exceptions.PolarsError as e:
        raise BhavcopyError(f"{name}: not a well-formed CSV: {e}") from None
    frame = raw.with_columns(pl.col(c).str.strip_chars() for c in COLUMNS)
    frame = frame.with_columns(
        pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in COLUMNS
    )
    for c in _REQUIRED:
        if (n := frame[c].null_count()) > 0:
            raise BhavcopyError(f"{name}: {c} is empty on {n} rows")
    typed: list[pl.Series] = []
    for c in COLUMNS:
        s = frame[c]
        try:
            if c in _DATES:
                s = s.str.to_date("%Y-%m-%d", strict=True)
            elif c in _FLOATS:
                s = s.cast(pl.Float64, strict=True)
            elif c in _INTS:
                f = s.cast(pl.Float64, strict=True)
                if not (f.is_null() | (f == f.round(0))).all():
                    raise BhavcopyError(f"{name}: {c} has a value that is not a whole number")
                s = f.cast(pl.Int64, strict=True)
        except pl.exceptions.PolarsError:
            bad = frame[c].drop_nulls().head(1).to_list()
            raise BhavcopyError(f"{name}: {c} has a value that is not a {SCHEMA[c].__name__} "
                                f"(first value: {bad[0] if bad else None!r})") from None  # fmt: skip
        typed.append(s.alias(c))
    frame = pl.DataFrame(typed)
    # A header-only file is zero rows (nothing traded): its instruments with ticks then show up
    # as missing in the bhavcopy, so it cannot pass unnoticed.
    days = frame["TradDt"].unique().to_list()
    if frame.height and days != [day]:
        raise BhavcopyError(f"{name}: TradDt is {sorted(str(d) for d in days)}, not {day}")
    segs = frame["Sgmt"].unique().to_list()
    if frame.height and segs != [segment]:
        raise BhavcopyError(f"{name}: Sgmt is {sorted(segs)}, not {segment}")
    dup = frame.filter(pl.col("FinInstrmId").is_duplicated())["FinInstrmId"].unique().to_list()
    if dup:
        raise BhavcopyError(
            f"{name}: FinInstrmId repeated on several rows: {sorted(dup)[:10]} (it is the key)"
        )
    # Column lists into positional structs: the values are typed and checked above already.
    return [BhavcopyRow(*t) for t in zip(*(frame[c].to_list() for c in COLUMNS), strict=True)]


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def encode_bhavcopy(rows: list[BhavcopyRow], segment: Segment, day: date) -> bytes:
    """The zipped UDiFF file of ``rows`` (prices with two decimals), as NSE publishes it."""
    buf = io.StringIO()
    buf.write(",".join(COLUMNS) + "\n")
    for r in rows:
        buf.write(",".join(_fmt(getattr(r, f)) for f in _FIELDS) + "\n")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(bhavcopy_filename(segment, day).removesuffix(".zip"), buf.getvalue())
    return out.getvalue()


def bhavcopy_url(template: str, segment: Segment, day: date) -> str:
    """The URL of the day's file of ``segment`` from a template (fields: ``filename``,
    ``segment``, ``segment_lower``, ``yyyymmdd``, ``date``; ``NADI_BHAVCOPY_URL``)."""
    return template.format(
        filename=bhavcopy_filename(segment, day), segment=segment,
        segment_lower=segment.lower(), yyyymmdd=f"{day:%Y%m%d}", date=day.isoformat(),
    )  # fmt: skip


class Fetched(msgspec.Struct, frozen=True):
    """One file as found: its bytes and where they came from (a path or a URL)."""

    segment: Segment
    data: bytes
    origin: str


async def load_bhavcopy(
    segment: Segment, day: date, *, directory: str | Path | None, url_template: str,
    timeout_s: float = 30.0, client: httpx.AsyncClient | None = None,
) -> Fetched | None:  # fmt: skip
    """The day's zipped file of ``segment``: from ``directory`` when it is there (an operator
    or ``nadi simulate --bhavcopy-dir`` drops NSE's files there), else from the URL; None when
    neither has it (the URL answers 404). Raises ``httpx.HTTPError`` on other failures."""
    name = bhavcopy_filename(segment, day)
    if directory:
        path = Path(directory) / name
        if path.is_file():
            return Fetched(segment, path.read_bytes(), str(path))
    if not url_template:
        return None
    url = bhavcopy_url(url_template, segment, day)
    # nsearchives.nseindia.com refuses clients without a browser-like User-Agent.
    headers = {"User-Agent": "Mozilla/5.0 (nadi bhavcopy fetch)", "Accept": "*/*"}
    own = client is None
    c = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)
    try:
        r = await c.get(url, headers=headers)
    finally:
        if own:
            await c.aclose()
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return Fetched(segment, r.content, url)

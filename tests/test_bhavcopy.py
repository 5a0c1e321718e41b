"""NSE's UDiFF bhavcopy files (nadi/bhavcopy.py): the exact format, and what is refused."""

from __future__ import annotations

import io
import zipfile
from datetime import date
from pathlib import Path

import pytest

from nadi.bhavcopy import (
    COLUMNS,
    BhavcopyError,
    BhavcopyRow,
    bhavcopy_filename,
    bhavcopy_url,
    encode_bhavcopy,
    load_bhavcopy,
    parse_bhavcopy,
)
from nadi.settings import Settings

DAY = date(2026, 9, 1)
# NSE's header, as published since 8 July 2024 (34 columns).
GOLDEN_HEADER = (
    "TradDt,BizDt,Sgmt,Src,FinInstrmTp,FinInstrmId,ISIN,TckrSymb,SctySrs,XpryDt,"
    "FininstrmActlXpryDt,StrkPric,OptnTp,FinInstrmNm,OpnPric,HghPric,LwPric,ClsPric,LastPric,"
    "PrvsClsgPric,UndrlygPric,SttlmPric,OpnIntrst,ChngInOpnIntrst,TtlTradgVol,TtlTrfVal,"
    "TtlNbOfTxsExctd,SsnId,NewBrdLotQty,Rmks,Rsvd1,Rsvd2,Rsvd3,Rsvd4"
)
# Rows in NSE's layout: an EQ row and a BL (block deal) row on one ISIN, each with its own token.
CM_ROWS = (
    "2026-09-01,2026-09-01,CM,NSE,STK,2885,INE002A01018,RELIANCE,EQ,,,,,RELIANCE INDUSTRIES LTD,"
    "1318.00,1328.00,1314.60,1318.10,1316.50,1313.60,,1318.10,,,12694362,16735000000.00,226862,"
    "F1,1,,,,,\n"
    "2026-09-01,2026-09-01,CM,NSE,STK,902885,INE002A01018,RELIANCE,BL,,,,,RELIANCE INDUSTRIES LTD,"
    "1320.00,1320.00,1320.00,1320.00,1320.00,1313.60,,1320.00,,,800000,1056000000.00,1,F1,1,,,,,\n"
)
FO_ROWS = (
    "2026-09-01,2026-09-01,FO,NSE,IDF,68407,,NIFTY,,2026-09-29,2026-09-29,,,NIFTY26SEPFUT,"
    "24200.00,24296.10,24064.00,24090.30,24081.00,24251.40,24055.80,24090.30,16051815,323310,"
    "57171,89746405775.00,39620,F1,65,,,,,\n"
)


def zipped(text: str, name: str = "BhavCopy_NSE_CM_0_0_0_20260901_F_0000.csv") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(name, text)
    return out.getvalue()


def test_columns_are_nses_header_and_names() -> None:
    assert ",".join(COLUMNS) == GOLDEN_HEADER and len(COLUMNS) == 34
    assert bhavcopy_filename("CM", DAY) == "BhavCopy_NSE_CM_0_0_0_20260901_F_0000.csv.zip"
    assert bhavcopy_filename("FO", DAY) == "BhavCopy_NSE_FO_0_0_0_20260901_F_0000.csv.zip"


def test_eq_and_bl_rows_of_one_isin_stay_two_instruments() -> None:
    rows = parse_bhavcopy(zipped(GOLDEN_HEADER + "\n" + CM_ROWS), "CM", DAY)
    assert [(r.fin_instrm_id, r.scty_srs, r.isin) for r in rows] == [
        (2885, "EQ", "INE002A01018"),
        (902885, "BL", "INE002A01018"),
    ]
    eq = rows[0]
    assert (eq.opn_pric, eq.cls_pric, eq.ttl_tradg_vol, eq.volume_shares) == (
        1318.0, 1318.1, 12694362, 12694362,
    )  # fmt: skip
    assert eq.opn_intrst is None and eq.xpry_dt is None and eq.rsvd4 is None


def test_fo_volume_is_in_contracts_and_oi_in_shares() -> None:
    (r,) = parse_bhavcopy(zipped(GOLDEN_HEADER + "\n" + FO_ROWS), "FO", DAY)
    assert (r.fin_instrm_tp, r.fin_instrm_id, r.isin, r.xpry_dt) == (
        "IDF", 68407, None, date(2026, 9, 29),
    )  # fmt: skip
    assert (r.opn_intrst, r.chng_in_opn_intrst, r.sttlm_pric) == (16051815, 323310, 24090.3)
    assert r.ttl_tradg_vol == 57171 and r.volume_shares == 57171 * 65  # contracts x lot


def test_round_trip_through_the_writer() -> None:
    rows = parse_bhavcopy(zipped(GOLDEN_HEADER + "\n" + FO_ROWS), "FO", DAY)
    data = encode_bhavcopy(rows, "FO", DAY)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["BhavCopy_NSE_FO_0_0_0_20260901_F_0000.csv"]
        assert zf.read(zf.namelist()[0]).decode() == GOLDEN_HEADER + "\n" + FO_ROWS
    assert parse_bhavcopy(data, "FO", DAY) == rows


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (GOLDEN_HEADER.replace(",Rsvd4", ""), "missing ['Rsvd4']"),
        (GOLDEN_HEADER.replace("ClsPric", "ClosePrice"), "unexpected ['ClosePrice']"),
        (GOLDEN_HEADER.replace("OpnPric,HghPric", "HghPric,OpnPric"), "out of order"),
        # The pre-July-2024 layout.
        ("SYMBOL,SERIES,OPEN,HIGH,LOW,CLOSE,LAST,PREVCLOSE,TOTTRDQTY,TOTTRDVAL,TIMESTAMP,"
         "TOTALTRADES,ISIN", "missing ["),
    ],
)  # fmt: skip
def test_a_wrong_header_is_refused(header: str, why: str) -> None:
    with pytest.raises(BhavcopyError, match="header") as e:
        parse_bhavcopy(zipped(header + "\n" + CM_ROWS), "CM", DAY)
    assert why in str(e.value)


def test_a_row_of_another_day_is_refused() -> None:
    text = GOLDEN_HEADER + "\n" + CM_ROWS.replace("2026-09-01,2026-09-01,CM,NSE,STK,902885",
                                                  "2026-08-31,2026-08-31,CM,NSE,STK,902885")  # fmt: skip
    with pytest.raises(BhavcopyError, match=r"TradDt is \['2026-08-31', '2026-09-01'\], not "):
        parse_bhavcopy(zipped(text), "CM", DAY)
    # The whole file of the day before, under today's name.
    with pytest.raises(BhavcopyError, match="not 2026-09-02"):
        parse_bhavcopy(zipped(GOLDEN_HEADER + "\n" + CM_ROWS), "CM", date(2026, 9, 2))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (zipped(GOLDEN_HEADER + "\n" + CM_ROWS).replace(b"PK", b"XX"), "not a zip"),
        ((GOLDEN_HEADER + "\n" + CM_ROWS).encode(), "not a zip"),  # unzipped CSV
        (zipped(GOLDEN_HEADER + "\n" + FO_ROWS), "Sgmt is ['FO'], not CM"),
        (zipped(GOLDEN_HEADER + "\n" + CM_ROWS + CM_ROWS.split("\n")[0] + "\n"), "repeated"),
        (zipped(GOLDEN_HEADER + "\n" + CM_ROWS.replace("1318.00", "n/a", 1)), "OpnPric"),
        (zipped(GOLDEN_HEADER + "\n" + CM_ROWS.replace(",12694362,", ",12694362.5,")), "whole"),
        (zipped(GOLDEN_HEADER + "\n" + CM_ROWS.replace(",2885,", ",,", 1)), "FinInstrmId is empty"),
    ],
)  # fmt: skip
def test_malformed_files_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(BhavcopyError) as e:
        parse_bhavcopy(data, "CM", DAY)
    assert why in str(e.value)


def test_a_header_only_file_is_zero_rows() -> None:
    assert parse_bhavcopy(zipped(GOLDEN_HEADER + "\n"), "FO", DAY) == []


def test_zip_with_other_members_is_refused() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("a.csv", GOLDEN_HEADER + "\n")
        zf.writestr("b.csv", GOLDEN_HEADER + "\n")
    with pytest.raises(BhavcopyError, match="one CSV"):
        parse_bhavcopy(out.getvalue(), "CM", DAY)


def test_url_template_and_settings() -> None:
    nse = "https://nsearchives.nseindia.com/content/{segment_lower}/{filename}"
    assert bhavcopy_url(nse, "FO", DAY) == (
        "https://nsearchives.nseindia.com/content/fo/BhavCopy_NSE_FO_0_0_0_20260901_F_0000.csv.zip"
    )
    s = Settings(recovery_url="http://127.0.0.1:9/", bhavcopy_url="")
    assert s.bhavcopy_url_template == "http://127.0.0.1:9/v1/bhavcopy/{filename}"
    assert Settings(bhavcopy_url=nse).bhavcopy_url_template == nse
    with pytest.raises(ValueError, match="unknown fields"):
        Settings(bhavcopy_url="http://x/{day}/{filename}")
    with pytest.raises(ValueError, match="needs"):
        Settings(bhavcopy_url="http://x/{yyyymmdd}.zip")  # CM and FO would be one URL


async def test_load_reads_the_directory_first(tmp_path: Path) -> None:
    data = zipped(GOLDEN_HEADER + "\n" + CM_ROWS)
    (tmp_path / bhavcopy_filename("CM", DAY)).write_bytes(data)
    got = await load_bhavcopy("CM", DAY, directory=tmp_path, url_template="")
    assert got is not None and got.data == data and got.origin.startswith(str(tmp_path))
    assert await load_bhavcopy("FO", DAY, directory=tmp_path, url_template="") is None


def test_row_fields_are_the_columns_in_order() -> None:
    assert len(BhavcopyRow.__struct_fields__) == len(COLUMNS)
    assert BhavcopyRow.__struct_fields__[:6] == (
        "trad_dt", "biz_dt", "sgmt", "src", "fin_instrm_tp", "fin_instrm_id",
    )  # fmt: skip

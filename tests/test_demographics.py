"""Demographics contract: every bad CSV names its line and field; round trip; encoding; BMI and BSA."""

import math

import numpy as np
import pytest

from libs.demographics import (
    Demographics,
    DemographicsError,
    encode_many,
    read_demographics_csv,
    write_demographics_csv,
)

HEADER = "subject_id,height_m,weight_kg,sex,age_years"
GOOD = "a01,1.75,80.0,M,50.0"


def _csv(tmp_path, *lines, name="demographics.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(path) -> str:
    with pytest.raises(DemographicsError) as info:
        read_demographics_csv(path)
    return str(info.value)


@pytest.mark.parametrize("row, field, words", [
    ("b02,,80,M,50", "height_m", ["missing"]),
    ("b02,1.75,80,,50", "sex", ["missing"]),
    ("b02,1.75,80,M", "age_years", ["missing"]),
    ("b02,nan,80,M,50", "height_m", ["finite"]),
    ("b02,1.75,NaN,M,50", "weight_kg", ["finite"]),
    ("b02,1.75,eighty,M,50", "weight_kg", ["not a number"]),
    ("b02,175,80,M,50", "height_m", ["centimetres", "metres"]),
    ("b02,1.75,20,M,50", "weight_kg", ["outside"]),
    ("b02,1.75,300,M,50", "weight_kg", ["outside"]),
    ("b02,1.75,80,M,-1", "age_years", ["outside"]),
    ("b02,1.75,80,M,130", "age_years", ["outside"]),
    ("b02,1.75,80,X,50", "sex", ["M or F"]),
])
def test_bad_row_names_line_and_field(tmp_path, row, field, words):
    path = _csv(tmp_path, HEADER, GOOD, row)
    msg = _error(path)
    for expected in [str(path), "line 3", field, *words]:
        assert expected in msg, f"for row {row!r} expected {expected!r} in the message, got: {msg}"


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _csv(tmp_path, HEADER, GOOD, "b02,1.60,60,F,40", "a01,1.80,90,M,60")
    msg = _error(path)
    for expected in ["a01", "line 4", "line 2", "duplicate"]:
        assert expected in msg, f"expected {expected!r} in the duplicate-id message, got: {msg}"


def test_missing_column(tmp_path):
    path = _csv(tmp_path, "subject_id,height_m,weight_kg,sex", "a01,1.75,80,M")
    msg = _error(path)
    assert "age_years" in msg and str(path) in msg, f"expected the file and 'age_years' named, got: {msg}"


def test_height_column_in_wrong_units(tmp_path):
    path = _csv(tmp_path, "subject_id,height,weight_kg,sex,age_years", "a01,175,80,M,50")
    msg = _error(path)
    for expected in ["'height'", "height_m", "metres"]:
        assert expected in msg, f"expected {expected!r} in the message, got: {msg}"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    msg = _error(path)
    assert "empty" in msg and "empty.csv" in msg, f"expected an 'empty file' message naming it, got: {msg}"
    msg = _error(_csv(tmp_path, HEADER, name="header_only.csv"))
    assert "no subjects" in msg, f"a header without rows should say 'no subjects', got: {msg}"
    msg = _error(tmp_path / "absent.csv")
    assert "absent.csv" in msg, f"a missing file should be named, got: {msg}"


def test_round_trip(tmp_path):
    records = [Demographics("a01", 1.75, 80.0, "M", 50.0), Demographics("b-02", 1.623, 58.4, "F", 71.5),
               Demographics("c.03", 2.0, 100.0, "F", 20.0)]
    path = write_demographics_csv(tmp_path / "sub" / "demographics.csv", records)
    back = read_demographics_csv(path)
    assert back == records, f"round trip: expected {records}, got {back}"
    assert path.read_text().splitlines()[0] == HEADER, f"header: got {path.read_text().splitlines()[0]!r}"
    with pytest.raises(DemographicsError, match="a01"):
        write_demographics_csv(tmp_path / "dup.csv", [records[0], records[0]])
    assert not (tmp_path / "dup.csv").exists(), "a refused CSV must not be written"


def test_lowercase_sex_and_spaces_accepted(tmp_path):
    path = _csv(tmp_path, HEADER, "a01, 1.75, 80, m, 50", "b02,1.60,60,f,40")
    got = [r.sex for r in read_demographics_csv(path)]
    assert got == ["M", "F"], f"sex: expected ['M', 'F'], got {got}"


def test_encode_known_subject():
    got = Demographics("a01", 1.75, 80.0, "M", 50.0).encode()
    assert got.dtype == np.float32 and got.shape == (4,), \
        f"encode: expected float32 (4,), got {got.dtype} {got.shape}"
    np.testing.assert_allclose(got, [0.75, 0.5, 1.0, 0.5], rtol=1e-6,
                               err_msg="encode(1.75 m, 80 kg, M, 50 y)")
    female = Demographics("b", 1.60, 30.0, "F", 20.0).encode()
    np.testing.assert_allclose(female, [0.6, 0.0, 0.0, 0.2], atol=1e-6,
                               err_msg="encode(1.60 m, 30 kg, F, 20 y)")
    many = encode_many([Demographics("a", 1.75, 80.0, "M", 50.0), Demographics("b", 1.60, 30.0, "F", 20.0)])
    np.testing.assert_allclose(many, np.stack([got, female]), err_msg="encode_many rows")


def test_bmi_and_dubois_bsa():
    d = Demographics("a01", 1.80, 80.0, "M", 40.0)
    assert d.bmi == pytest.approx(80.0 / 1.8**2), f"BMI: expected {80 / 1.8**2:.3f}, got {d.bmi}"
    want = 0.007184 * 80.0**0.425 * 180.0**0.725
    assert d.bsa_m2 == pytest.approx(want, rel=1e-12), f"BSA: expected {want}, got {d.bsa_m2}"
    assert d.bsa_m2 == pytest.approx(1.99, abs=0.01), f"BSA of 180 cm / 80 kg ≈ 1.99 m², got {d.bsa_m2}"


def test_numpy_numbers_accepted():
    d = Demographics("n1", np.float32(1.75), np.int64(80), "M", np.float64(50.0))
    np.testing.assert_allclose(d.encode(), [0.75, 0.5, 1.0, 0.5], rtol=1e-6,
                               err_msg="encode of numpy scalars")
    for bad in (math.nan, math.inf, None, "1.75", True):
        with pytest.raises(DemographicsError, match="height_m"):
            Demographics("n1", bad, 80.0, "M", 50.0)

"""Source adapters on the shared real excerpts and on generated folders in each public layout."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from covidcxr.data import ManifestError, load_source, map_finding, read_covidx_labels, write_covidx_labels
from test_data_factories import make_cohen, make_folder, make_radiography_db, make_rsna


@pytest.mark.parametrize(
    "finding,label",
    [("COVID-19", "COVID-19"), ("COVID-19, ARDS", "COVID-19"), ("Pneumonia/Viral/COVID-19", "COVID-19"),
     ("SARS", "pneumonia"), ("MERS", "pneumonia"), ("Streptococcus", "pneumonia"), ("Klebsiella", "pneumonia"),
     ("Chlamydophila", "pneumonia"), ("Legionella", "pneumonia"), ("E.Coli", "pneumonia"),
     ("Pneumonia/Bacterial/Klebsiella", "pneumonia"), ("Pneumonia", "pneumonia"), ("Varicella", "pneumonia"),
     ("No Finding", "normal"), ("ARDS", None), ("Pneumonia/Lipoid", None), ("", None), ("todo", None)],
)
def test_covidx_label_mapping(finding, label):
    assert map_finding(finding) == label


def test_strict_mapping_is_the_notebook():
    assert map_finding("Varicella", strict=True) is None
    assert map_finding("E.Coli", strict=True) == "pneumonia"


def test_cohen_generated_layout(tmp_path):
    df, dropped = load_source("cohen", make_cohen(tmp_path / "cohen"))
    assert sorted(Path(p).name for p in df["path"]) == sorted(["c1.png", "c1b.png", "c2.jpg", "s3.png", "s4.png", "n5.png", "k6.png"])
    lab = dict(zip(df["path"].map(lambda p: Path(p).name), df["label"]))
    assert lab["c1b.png"] == "COVID-19" and lab["c2.jpg"] == "COVID-19"
    assert lab["s3.png"] == lab["s4.png"] == lab["k6.png"] == "pneumonia" and lab["n5.png"] == "normal"
    assert set(df["patient_id"]) >= {"cohen-1", "cohen-2"}
    assert dropped == {"not frontal": 1, "modality CT": 1, "empty finding": 1, "finding not mapped": 2,
                       "image file missing": 1}
    assert all(Path(p).is_absolute() for p in df["path"])


def test_cohen_real_excerpt(shared_dir):
    df, dropped = load_source("cohen", shared_dir / "source-samples" / "cohen")
    names = set(df["path"].map(lambda p: Path(p).name))
    assert "000002-7.png" not in names  # the lateral Influenza view
    assert dropped.get("not frontal", 0) >= 1
    lab = dict(zip(df["path"].map(lambda p: Path(p).name), df["label"]))
    assert lab["covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-3.jpg"] == "COVID-19"
    assert lab["SARS-10.1148rg.242035193-g04mr34g07a-Fig7a-day5.jpeg"] == "pneumonia"
    assert lab["16745_6_1.png"] == "normal"
    assert df["patient_id"].str.startswith("cohen-").all()


def test_actualmed_real_excerpt(shared_dir):
    root = shared_dir / "source-samples" / "actualmed"
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    df, dropped = load_source("actualmed", root)
    assert len(df) == (meta["finding"] != "").sum()
    assert dropped == {"empty finding": int((meta["finding"] == "").sum())}
    assert set(df["label"]) == {"COVID-19", "normal"}
    assert df["patient_id"].str.startswith("actualmed-ANON").all()


def test_figure1_real_excerpt(shared_dir):
    df, dropped = load_source("figure1", shared_dir / "source-samples" / "figure1")
    assert dropped.get("empty finding", 0) >= 1
    assert set(df["label"]) <= {"COVID-19", "pneumonia", "normal"}
    # suffixed ids (COVID-00040a) are one case; the letter is dropped from the patient id
    row = df[df["path"].str.endswith("COVID-00040a.jpg")]
    assert row["patient_id"].item() == "figure1-COVID-00040" and row["label"].item() == "normal"


def test_rsna_generated_dicoms(tmp_path):
    df, dropped = load_source("rsna", make_rsna(tmp_path / "rsna"))
    got = dict(zip(df["patient_id"], df["label"]))
    assert got == {"rsna-p-normal": "normal", "rsna-p-opac": "pneumonia", "rsna-p-normal2": "normal"}
    assert dropped == {"No Lung Opacity / Not Normal": 1, "not frontal": 1}
    assert set(df["view"]) == {"PA", "AP"}


def test_radiography_db_layout(tmp_path):
    df, _ = load_source("radiography-db", make_radiography_db(tmp_path / "rdb"))
    counts = df["label"].value_counts().to_dict()
    assert counts == {"COVID-19": 3, "normal": 2, "pneumonia": 4}
    assert not df["path"].str.contains("/masks/").any()
    df2, dropped = load_source("radiography-db", tmp_path / "rdb", include_lung_opacity=False)
    assert len(df2) == 7 and dropped == {"Lung_Opacity excluded": 2}


def test_folder_layout(tmp_path):
    df, dropped = load_source("folder", make_folder(tmp_path / "myset"))
    assert df["label"].value_counts().to_dict() == {"normal": 2, "pneumonia": 2, "COVID-19": 2}
    assert dropped == {"folder 'other' is not a class": 1}
    assert (df["source"] == "myset").all()


def test_csv_dev_set_mapping(dev_dir):
    df, dropped = load_source("csv", dev_dir / "metadata.csv")
    assert len(df) == 443 and dropped == {}
    assert df["label"].value_counts().to_dict() == {"COVID-19": 361, "pneumonia": 52, "normal": 30}
    assert df["geographic_extent"].notna().sum() == 256 and df["opacity"].notna().sum() == 256
    # both scores run 0-8 in the data (the dev README says 0-6 for opacity; 6 images score above 6)
    assert df["geographic_extent"].max() <= 8 and df["opacity"].max() <= 8
    masks = df["mask_path"].dropna()
    assert len(masks) == 136 and all(Path(m).is_file() and "/masks/" in m for m in masks)
    assert all(Path(p).is_file() and "/images/" in p for p in df["path"])
    assert set(df["source"]) == {"cohen", "actualmed", "figure1"}
    assert "finding" in df.columns and "view" in df.columns


def test_csv_column_map_and_errors(tmp_path):
    from test_data_factories import write_png

    write_png(tmp_path / "a.png")
    (tmp_path / "x.csv").write_text("file,diag,pid\na.png,Pneumonia,P1\n")
    df, _ = load_source("csv", tmp_path / "x.csv", column_map={"path": "file", "label": "diag", "patient_id": "pid"})
    assert df[["patient_id", "label", "source"]].values.tolist() == [["P1", "pneumonia", "csv"]]
    (tmp_path / "y.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ManifestError, match="y.csv: no image column"):
        load_source("csv", tmp_path / "y.csv")
    with pytest.raises(ManifestError, match="not found"):
        load_source("cohen", tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="unknown source kind"):
        load_source("kaggle", tmp_path)


def test_covidx_files_real(shared_dir):
    d = shared_dir / "covidx-labels"
    b8 = read_covidx_labels(d / "test_COVIDx8B.txt")
    assert len(b8) == 400 and set(b8["label"]) == {"COVID-19", "negative"}
    a9 = read_covidx_labels(d / "test_COVIDx9A.txt")
    assert set(a9["label"]) == {"COVID-19", "pneumonia", "normal"}
    sev = read_covidx_labels(d / "test_COVIDxSev.txt")
    assert set(sev["severity_level"].dropna()) == {"level1", "level2"} and (sev["label"] == "COVID-19").all()


def test_covidx_patient_ids_with_spaces_roundtrip(tmp_path):
    text = ("COVID 12 a img1.png positive cohen\n"
            "ANON 7 img2.jpg negative actualmed\n"
            "3 img3.png positive rsna\n")
    p = tmp_path / "test_COVIDx8B.txt"
    p.write_text(text)
    df = read_covidx_labels(p)
    assert df["patient_id"].tolist() == ["COVID 12 a", "ANON 7", "3"]
    assert df["path"].tolist() == ["img1.png", "img2.jpg", "img3.png"]
    assert df["source"].tolist() == ["cohen", "actualmed", "rsna"]
    out = write_covidx_labels(df, tmp_path / "out.txt", label_style="binary")
    assert out.read_text() == text
    (tmp_path / "bad.txt").write_text("only three fields\n")
    with pytest.raises(ManifestError, match="bad.txt: line 1"):
        read_covidx_labels(tmp_path / "bad.txt")


def test_covidx_sev_roundtrip_and_adapter(tmp_path):
    from test_data_factories import distinct_image, write_png

    (tmp_path / "train").mkdir()
    for i in range(2):
        write_png(tmp_path / "train" / f"s{i}.png", distinct_image(i))
    p = tmp_path / "train_COVIDxSev.txt"
    p.write_text("A s0.png level1 ricord\nB s1.png level2 ricord\nC gone.png level2 ricord\n")
    df, dropped = load_source("covidx", p)
    assert df["severity_level"].tolist() == ["level1", "level2"] and dropped == {"image file missing": 1}
    assert all(Path(x).parent == (tmp_path / "train").resolve() for x in df["path"])
    out = write_covidx_labels(df, tmp_path / "o.txt", label_style="severity")
    assert out.read_text().splitlines() == ["A s0.png level1 ricord", "B s1.png level2 ricord"]
    assert read_covidx_labels(tmp_path / "train_COVIDxSev.txt")["severity_level"].notna().all()
